"""Probe scan (prefix sharing == naive skip), MoE dead experts vs independent routing counts, and
``run_scan`` end to end (scan.json, charts, cache) on the tiny seed architectures."""

import json
import string

import pytest
import torch
from tokenizers import Tokenizer, models, processors
from transformers import PreTrainedTokenizerFast

from darwin_hydra.arch import decoder_layers, text_config
from darwin_hydra.mri.config import MriConfig, ProbeSetConfig, ProbesConfig
from darwin_hydra.mri.moe import find_routers, moe_scan
from darwin_hydra.mri.probes import _reduce, _token_distance, layer_importance, load_probe_prompts, text_decoder
from darwin_hydra.testing.tiny import TINY_ARCHS, perturbed_copy, save_tiny, tiny_model


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one torch thread is fastest, and immune to other processes on a shared 2-core box."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

ALPHABET = string.ascii_lowercase + string.digits + " +=:?"
PROMPTS = {
    "MATH": ["12+7=19", "3+4=", "100+250=350 ok", "9+9="],
    "CODE": ["rev:abc=cba", "sort:3121=", "kv:a1 b2?a=", "copy:xyz=xyz"],
}


def char_tokenizer(padding_side: str = "right") -> PreTrainedTokenizerFast:
    vocab = {t: i for i, t in enumerate(["<pad>", "<s>", "</s>", "<unk>"])}
    vocab.update({c: 4 + i for i, c in enumerate(ALPHABET)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.add_special_tokens(["<pad>", "<s>", "</s>", "<unk>"])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        padding_side=padding_side,
    )


@torch.no_grad()
def naive_importance(model, tok, prompts, reduce="mean"):
    """Skip each layer in its own full forward: a hook replaces the layer's output by its input."""
    _, layers, norm = text_decoder(model)
    out = {}
    cap = {}
    h = norm.register_forward_hook(lambda m, a, o: cap.__setitem__("o", o))
    for name, texts in prompts.items():
        enc = tok(texts, padding=True, padding_side="right", return_tensors="pt")
        batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        model(**batch)
        ref = cap["o"]
        dist = []
        for layer in layers:
            skip = layer.register_forward_hook(
                lambda m, args, kwargs, o: args[0] if args else kwargs["hidden_states"], with_kwargs=True
            )
            model(**batch)
            skip.remove()
            dist.append(float(_reduce(_token_distance(ref, cap["o"]), batch["attention_mask"], reduce).mean()))
        out[name] = dist
    h.remove()
    return out


@pytest.mark.parametrize("arch", TINY_ARCHS)
@pytest.mark.parametrize("reduce", ["mean", "last"])
def test_prefix_shared_scan_equals_naive_skip(arch, reduce):
    model = tiny_model(arch, num_layers=4)
    tok = char_tokenizer(padding_side="left")  # the scan right-pads whatever the tokenizer says
    scan = layer_importance(model, tok, PROMPTS, max_length=32, batch_size=8, reduce=reduce, progress=False)
    ref = naive_importance(model, tok, PROMPTS, reduce)
    for name in PROMPTS:
        assert scan.importance[name] == pytest.approx(ref[name], abs=1e-5), (arch, name)
        assert all(v >= 0 for v in scan.block_influence[name])
    # one batch per set: L + L(L-1)/2 layer evaluations each, vs L*L naive
    L = 4
    assert scan.layer_evals == 2 * (L + L * (L - 1) // 2) == 20
    assert scan.naive_layer_evals == 2 * L * L
    assert sum(sum(v) for v in scan.importance.values()) > 0


def _reference_copy(model, layers_changed, scale=0.05, seed=3):
    import copy

    ref = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    _, ref_layers, _ = text_decoder(ref)
    with torch.no_grad():
        for l in layers_changed:
            for p in ref_layers[l].parameters():
                p.add_(torch.randn(p.shape, generator=g) * scale * (float(p.std()) if p.numel() > 1 else 1.0))
    return ref


@torch.no_grad()
def naive_delta(model, ref, tok, prompts):
    """Layer l's output replaced by the reference layer l's output on the same arguments, one full pass per layer."""
    _, layers, norm = text_decoder(model)
    _, ref_layers, _ = text_decoder(ref)
    cap, out = {}, {}
    h = norm.register_forward_hook(lambda m, a, o: cap.__setitem__("o", o))
    for name, texts in prompts.items():
        enc = tok(texts, padding=True, padding_side="right", return_tensors="pt")
        batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "use_cache": False}
        model(**batch)
        full = cap["o"]
        dist = []
        for l, layer in enumerate(layers):
            swap = layer.register_forward_hook(
                lambda m, args, kwargs, o, l=l: ref_layers[l](*args, **kwargs), with_kwargs=True
            )
            model(**batch)
            swap.remove()
            dist.append(float(_reduce(_token_distance(full, cap["o"]), batch["attention_mask"], "mean").mean()))
        out[name] = dist
    h.remove()
    return out


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_delta_probe_equals_naive_layer_swap_and_is_zero_where_weights_agree(arch):
    model = tiny_model(arch, num_layers=4)
    ref = _reference_copy(model, layers_changed=[1, 2], scale=0.3)
    tok = char_tokenizer()
    scan = layer_importance(model, tok, PROMPTS, max_length=32, batch_size=8, progress=False, reference=ref)
    ref_scan = naive_delta(model, ref, tok, PROMPTS)
    for name in PROMPTS:
        assert scan.delta[name] == pytest.approx(ref_scan[name], abs=1e-5), (arch, name)
        d = scan.delta[name]
        assert d[0] < 1e-6 and d[3] < 1e-6 and min(d[1], d[2]) > 1e-4, (arch, d)
    assert scan.delta_layer_evals == 2 * (4 * 5 // 2)
    assert scan.layer_evals == 2 * (4 + 6)
    assert layer_importance(model, tok, PROMPTS, progress=False).delta is None


def test_importance_is_independent_of_batching():
    model = tiny_model("llama", num_layers=3)
    tok = char_tokenizer()
    one = layer_importance(model, tok, PROMPTS, batch_size=1, progress=False)
    many = layer_importance(model, tok, PROMPTS, batch_size=4, progress=False)
    for name in PROMPTS:
        assert one.importance[name] == pytest.approx(many.importance[name], abs=1e-5)
    assert one.layer_evals == 8 * (3 + 3)


def _independent_counts(model, tok, texts, max_length=32):
    """Count routing at the experts' input (the top-k indices the experts module actually receives)."""
    counts, tokens = {}, 0
    handles = []
    for i, layer in enumerate(decoder_layers(model)):
        experts = next(m for n, m in layer.named_modules() if n.endswith("experts"))

        def hook(m, args, i=i):
            idx = args[1][valid["mask"]]
            counts[i] = counts.get(i, 0) + torch.bincount(idx.reshape(-1), minlength=m.num_experts)

        handles.append(experts.register_forward_pre_hook(hook))
    valid = {}
    with torch.no_grad():
        for j in range(0, len(texts), 3):
            enc = tok(texts[j : j + 3], padding=True, truncation=True, max_length=max_length, return_tensors="pt")
            valid["mask"] = enc["attention_mask"].reshape(-1).bool()
            tokens += int(valid["mask"].sum())
            model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    for h in handles:
        h.remove()
    return {i: (c.double() / tokens) for i, c in counts.items()}, tokens


def _moe_model(arch):
    if arch == "qwen3_5_moe":
        return tiny_model(arch, num_layers=4)
    from transformers import AutoConfig, AutoModelForCausalLM

    common = dict(vocab_size=128, hidden_size=32, num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=1,
                  num_experts_per_tok=2, intermediate_size=32)
    if arch == "qwen2_moe":
        cfg = AutoConfig.for_model(arch, num_experts=8, moe_intermediate_size=16, shared_expert_intermediate_size=16,
                                   decoder_sparse_step=1, **common)
    else:
        cfg = AutoConfig.for_model(arch, num_local_experts=8, **common)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg).eval()


@pytest.mark.parametrize("arch", ["qwen3_5_moe", "qwen2_moe", "mixtral"])
def test_moe_dead_experts_equal_independent_routing_counts(arch):
    model = _moe_model(arch)
    tok = char_tokenizer()
    texts = PROMPTS["MATH"] + PROMPTS["CODE"] + ["abcdefgh", "0123456789", "z z z z"]
    freq, tokens = _independent_counts(model, tok, texts)
    tc = text_config(model.config)
    k, E = tc.num_experts_per_tok, getattr(tc, "num_experts", None) or tc.num_local_experts
    # threshold 1.0 of the uniform share flags the under-used experts: a non-trivial set on random weights
    scan = moe_scan(model, tok, texts, batch_size=3, dead_threshold=1.0, dead_abs_threshold=0.2, progress=False)
    assert scan.tokens == tokens and scan.top_k == k and scan.num_experts == E
    assert scan.layers == sorted(find_routers(model)) == [0, 1, 2, 3]
    n_dead = 0
    for row, layer in enumerate(scan.layers):
        assert scan.frequency[row] == pytest.approx(freq[layer].tolist(), abs=1e-9)
        expect_rel = [f < 1.0 * k / E for f in freq[layer].tolist()]
        expect_abs = [f < 0.2 for f in freq[layer].tolist()]
        assert scan.dead_relative[row] == expect_rel
        assert scan.dead_absolute[row] == expect_abs
        n_dead += sum(expect_rel)
        assert sum(scan.frequency[row]) == pytest.approx(k)
        assert 0 < scan.routing_entropy[row] <= 3.0 + 1e-9  # log2(8) bits at most
    assert 0 < n_dead < len(scan.layers) * E
    assert scan.dead_experts() == {l: [e for e, d in enumerate(r) if d] for l, r in zip(scan.layers, scan.dead_relative)}
    per_layer = scan.per_layer()
    assert set(per_layer) == {0, 1, 2, 3} and "dead_share" in per_layer[0]


def test_moe_scan_is_none_for_a_dense_model():
    assert moe_scan(tiny_model("llama"), char_tokenizer(), ["abc"], progress=False) is None


def test_load_probe_prompts_from_local_files(tmp_path):
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps({"q": f"{i}+1="}) for i in range(5)) + "\n")
    (tmp_path / "c.csv").write_text("text\nrev:ab=\n \nsort:21=\n")
    cfg = ProbesConfig(
        name="t",
        sets={"MATH": ProbeSetConfig(source="zoo://m.jsonl", field="q", n=3),
              "CODE": ProbeSetConfig(source=str(tmp_path / "c.csv"), n=5)},
    )
    resolve = lambda u: str(tmp_path / u[6:]) if u.startswith("zoo://") else u  # noqa: E731
    prompts = load_probe_prompts(cfg, resolve)
    assert prompts == {"MATH": ["0+1=", "1+1=", "2+1="], "CODE": ["rev:ab=", "sort:21="]}
    bad = ProbesConfig(name="t", sets={"MATH": ProbeSetConfig(source="zoo://m.jsonl", field="text")})
    with pytest.raises(ValueError, match=r"probes.sets.MATH.source='zoo://m.jsonl'.*no column 'text'"):
        load_probe_prompts(bad, resolve)
    missing = ProbesConfig(name="t", sets={"MATH": ProbeSetConfig(source=str(tmp_path / "nope.jsonl"))})
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_probe_prompts(missing)


@pytest.fixture(scope="module")
def moe_pair(tmp_path_factory):
    d = tmp_path_factory.mktemp("pair")
    save_tiny("qwen3_5_moe", d / "father", num_layers=4)
    perturbed_copy(d / "father", d / "mother", scale=0.05)
    char_tokenizer().save_pretrained(d / "father")
    for name, texts in PROMPTS.items():
        (d / f"{name}.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in texts))
    probes = ProbesConfig(
        name="t", sets={k: ProbeSetConfig(source=f"zoo://{k}.jsonl", n=4) for k in PROMPTS}, batch_size=4
    )
    return d, probes, (lambda u: str(d / u[6:]) if u.startswith("zoo://") else u)


def test_run_scan_writes_scan_json_and_charts_and_hits_the_cache(moe_pair, tmp_path, monkeypatch):
    import darwin_hydra.mri.scan as scan_mod
    from darwin_hydra.mri.scan import MriResult, run_scan

    d, probes, resolve = moe_pair
    calls = {"probe": 0}
    real = scan_mod.layer_importance

    def counting(*a, **k):
        calls["probe"] += 1
        return real(*a, **k)

    monkeypatch.setattr(scan_mod, "layer_importance", counting)
    cfg = MriConfig(progress=False)
    first = run_scan(d / "father", d / "mother", probes, cfg, resolve, tmp_path / "cache", tmp_path / "out1")
    assert calls["probe"] == 2 and not first.from_cache
    data = json.loads((tmp_path / "out1" / "scan.json").read_text())
    assert set(data["tensors"]) == set(first.r_mri)
    assert data["probe"]["father"]["layer_evals"] == 2 * (4 + 6)
    assert data["moe"]["father"]["num_experts"] == 8
    assert all(0.0 <= r <= 1.0 for r in first.r_mri.values())
    for key in ("importance_father", "importance_mother", "advantage", "ratio", "experts"):
        assert first.chart_paths[key].exists() and first.chart_paths[key].stat().st_size > 1000
    # same parents, probes and scan settings, another prescription: no rescan
    second = run_scan(
        d / "father", d / "mother", probes, MriConfig(progress=False, sharpen="none"), resolve,
        tmp_path / "cache", tmp_path / "out2",
    )
    assert calls["probe"] == 2 and second.from_cache
    assert second.probe_mother.importance == first.probe_mother.importance
    # a scan setting changes the key: rescan
    run_scan(d / "father", d / "mother", probes, MriConfig(progress=False, probe_reduce="last"), resolve,
             tmp_path / "cache", None)
    assert calls["probe"] == 4
    # round trip and the stage's printout
    back = MriResult.from_json(first.to_json())
    assert back.r_mri == first.r_mri and back.moe_mother.frequency == first.moe_mother.frequency
    table = first.summary_table()
    assert "layer evaluations per parent: 20" in table and "dead A" in table
    assert len([ln for ln in table.splitlines() if ln.split() and ln.split()[0].isdigit()]) == 4  # one row a layer
