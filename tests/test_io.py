"""Checkpoint I/O: streaming reader, atomic sharded writer, pre-merge check, pickle policy, model resolution.

Tiny random-weight instances of the seeds' exact architectures (transformers' own config classes)
go through reader and writer tensor-exact and load back with ``from_pretrained``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from darwin_hydra.io import fingerprint as fp_module
from darwin_hydra.io.compat import IncompatibleParentsError, check_compatible
from darwin_hydra.io.fingerprint import tensor_sha256
from darwin_hydra.io.reader import CheckpointReader, PickleRefusedError
from darwin_hydra.io.writer import CheckpointWriter, storable, write_slot
from darwin_hydra.io.resolve import ModelNotFoundError, resolve_model
from darwin_hydra.testing.tiny import save_tiny

SEEDS = ("qwen3_5", "gemma4", "qwen3_5_moe")


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {arch: save_tiny(arch, root / arch) for arch in (*SEEDS, "llama")}


def disk_tensors(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def put(w: CheckpointWriter, name: str, t: torch.Tensor) -> None:
    """Reserve, write and fill one tensor (as stored by ``w``), in the order of the calls."""
    t = storable(name, t, w.dtype)
    w.fill(name, write_slot(w.reserve(name, t.dtype, t.shape), t))


def copy_through_writer(src: Path, out: Path, skip=(), **kw) -> Path:
    with CheckpointReader(src) as r, CheckpointWriter(out, source_dir=src, **kw) as w:
        for name, t in r.iter_tensors():
            if name not in skip:
                put(w, name, t)
    return out


def logits(path: Path) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        return model(torch.arange(1, 13).view(1, 12) % 100).logits


# ---- reader -------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", SEEDS)
def test_reader_matches_safetensors_headers_and_data(tiny_dirs, arch):
    path = tiny_dirs[arch]
    expected = disk_tensors(path)
    with CheckpointReader(path) as r:
        assert set(r.names) == set(expected) and len(r) == len(expected)
        assert r.config["model_type"].startswith(arch)  # qwen3_5 causal LMs save their text config
        with safe_open(str(path / "model.safetensors"), "pt") as f:
            # names in on-disk byte order
            offsets = [r.entry(n).start for n in r.names]
            assert offsets == sorted(offsets) and set(f.keys()) == set(r.names)
        for name, t in r.iter_tensors():
            assert torch.equal(t, expected[name]) and t.dtype == expected[name].dtype
            assert r.shape(name) == tuple(t.shape) and r.dtype(name) == t.dtype
            assert r.nbytes(name) == t.numel() * t.element_size() and name in r
        assert "no.such.tensor" not in r


def test_reader_get_is_thread_safe_and_owned(tiny_dirs):
    path = tiny_dirs["qwen3_5_moe"]
    expected = disk_tensors(path)
    with CheckpointReader(path) as r:
        with ThreadPoolExecutor(4) as pool:
            got = dict(zip(r.names * 3, pool.map(r.get, r.names * 3)))
        assert all(torch.equal(got[n], expected[n]) for n in r.names)
        t = r.get(r.names[0])
        t.add_(1.0)  # the caller owns it: the checkpoint is untouched
        assert torch.equal(r.get(r.names[0]), expected[r.names[0]])


def test_reader_errors_name_file_and_tensor(tiny_dirs, tmp_path):
    single = tiny_dirs["llama"] / "model.safetensors"
    assert CheckpointReader(single).names == CheckpointReader(tiny_dirs["llama"]).names
    with CheckpointReader(tiny_dirs["llama"]) as r:
        with pytest.raises(KeyError, match=r"model\.layers\.0\.mlp\.up_prj\.weight.*did you mean model\.layers\.0\.mlp\.up_proj\.weight"):
            r.get("model.layers.0.mlp.up_prj.weight")
    bad = tmp_path / "truncated"
    shutil.copytree(tiny_dirs["llama"], bad)
    f = bad / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(ValueError, match=r"model\.safetensors.*truncated"):
        CheckpointReader(bad)
    sharded = copy_through_writer(tiny_dirs["llama"], tmp_path / "sharded", max_shard_bytes=30_000)
    next(sharded.glob("model-00002-of-*.safetensors")).unlink()
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors\.index\.json.*model-00002-of"):
        CheckpointReader(sharded)
    with pytest.raises(FileNotFoundError, match="no such checkpoint directory"):
        CheckpointReader(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty: no weights found"):
        CheckpointReader(tmp_path / "empty")


def test_fingerprint_tracks_weights_not_layout(tiny_dirs, tmp_path, monkeypatch):
    src = tiny_dirs["llama"]
    fp = CheckpointReader(src).fingerprint()
    resharded = copy_through_writer(src, tmp_path / "resharded", max_shard_bytes=20_000)
    assert CheckpointReader(resharded).fingerprint() == fp  # same weights, other shards
    with CheckpointReader(src) as r, CheckpointWriter(tmp_path / "edited", source_dir=src) as w:
        for name, t in r.iter_tensors():
            if name == "model.layers.2.mlp.down_proj.weight":
                t[17, 5] += 1e-3  # one element of one tensor
            put(w, name, t)
    assert CheckpointReader(tmp_path / "edited").fingerprint() != fp
    # Large models: a strided sample per tensor (first and last window included).
    monkeypatch.setattr(fp_module, "FINGERPRINT_FULL_BYTES", 0)
    monkeypatch.setattr(fp_module, "FINGERPRINT_WINDOW", 64)
    sampled = CheckpointReader(src).fingerprint()
    assert sampled != fp and CheckpointReader(resharded).fingerprint() == sampled
    with CheckpointReader(src) as r, CheckpointWriter(tmp_path / "edited_last", source_dir=src) as w:
        for name, t in r.iter_tensors():
            if name == "model.embed_tokens.weight":
                t.view(-1)[-1] += 1.0  # in the last window
            put(w, name, t)
    assert CheckpointReader(tmp_path / "edited_last").fingerprint() != sampled


# ---- writer -------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", SEEDS)
def test_roundtrip_through_writer_is_exact_and_loadable(tiny_dirs, tmp_path, arch):
    src = tiny_dirs[arch]
    out = copy_through_writer(src, tmp_path / "child", max_shard_bytes=40_000)
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    assert len(shards) > 2 and not (out / "model.safetensors").exists()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    original = disk_tensors(src)
    assert set(index["weight_map"]) == set(original)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in original.values())
    for s in shards:
        assert s.stat().st_size <= 40_000 + 8 + 2 * CheckpointWriter.HEADER_RESERVE
        with safe_open(str(s), "pt") as f:
            assert all(index["weight_map"][k] == s.name for k in f.keys())
    child = disk_tensors(out)
    assert set(child) == set(original)
    assert all(torch.equal(child[n], original[n]) and child[n].dtype == original[n].dtype for n in original)
    sums = json.loads((out / "checksums.json").read_text())["tensors"]
    assert sums == {n: tensor_sha256(t) for n, t in original.items()}
    assert json.loads((out / "config.json").read_text()) == json.loads((src / "config.json").read_text())
    assert (out / "generation_config.json").exists()
    assert torch.equal(logits(out), logits(src))
    assert [p.name for p in tmp_path.iterdir()] == ["child"]  # no temporary directory left


def test_single_shard_and_dtype_cast(tiny_dirs, tmp_path):
    src = tiny_dirs["llama"]
    out = copy_through_writer(src, tmp_path / "bf16", dtype=torch.bfloat16)
    assert (out / "model.safetensors").exists() and not list(out.glob("model-*-of-*"))
    child = load_file(out / "model.safetensors")
    original = disk_tensors(src)
    assert all(child[n].dtype == torch.bfloat16 and torch.equal(child[n], original[n].bfloat16()) for n in original)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    # Compact header for a small shard: the file is header + data, nothing reserved.
    data = sum(t.numel() * t.element_size() for t in child.values())
    assert (out / "model.safetensors").stat().st_size < data + 16_000
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.bfloat16


def test_streaming_shards_with_reserved_headers(tiny_dirs, tmp_path):
    """Big shards are written in place (header reserved up front, no rewrite); a shard whose header
    reservation fills up is closed early. Both stay valid safetensors."""
    src = tiny_dirs["qwen3_5_moe"]
    w = CheckpointWriter(tmp_path / "child", max_shard_bytes=10**9, source_dir=src)
    w.COMPACT_BELOW = 0
    w.HEADER_RESERVE = 4096  # ~30 entries per shard
    with CheckpointReader(src) as r, w:
        for name, t in r.iter_tensors():
            put(w, name, t)
    out = tmp_path / "child"
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    assert len(shards) >= 5
    for s in shards:
        with open(s, "rb") as fh:
            assert int.from_bytes(fh.read(8), "little") == 4096
    assert all(torch.equal(a, b) for a, b in zip(disk_tensors(out).values(), [disk_tensors(src)[n] for n in disk_tensors(out)]))
    assert torch.equal(logits(out), logits(src))


def test_reserved_slots_written_in_any_order_give_the_same_files(tiny_dirs, tmp_path):
    """reserve() in order, write_slot() in reverse (as forked merge workers do), fill(): the same bytes
    as writing each tensor as it is reserved, over several shards, a compacted small one and a dtype
    cast included."""
    src = tiny_dirs["gemma4"]
    a = copy_through_writer(src, tmp_path / "in_order", max_shard_bytes=50_000, dtype=torch.float32)
    w = CheckpointWriter(tmp_path / "slots", max_shard_bytes=50_000, source_dir=src, dtype=torch.float32)
    with CheckpointReader(src) as r, w:
        tensors = {n: storable(n, t, torch.float32) for n, t in r.iter_tensors()}
        slots = {n: w.reserve(n, t.dtype, t.shape) for n, t in tensors.items()}
        for n in reversed(list(tensors)):
            w.fill(n, write_slot(slots[n], tensors[n]))
    b = tmp_path / "slots"
    assert len(list(a.glob("*.safetensors"))) > 2
    assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())
    for f in a.iterdir():
        assert f.read_bytes() == (b / f.name).read_bytes(), f.name


def test_mapped_reads_equal_pread_reads(tiny_dirs):
    src = tiny_dirs["gemma4"]
    plain, mapped = CheckpointReader(src), CheckpointReader(src)
    mapped.map_files()
    for name in plain.names:
        a, b = plain.stored(name), mapped.stored(name)
        n = a.numel()
        for lo, hi in ((0, n), (n // 3, n - n // 5), (n, n)):
            assert torch.equal(a.read(lo, hi).clone(), b.read(lo, hi)), name
        b.release()
    view = mapped.stored(plain.names[0]).read(0, 4)  # alive while the reader closes
    mapped.close()
    assert view.numel() == 4


def test_a_reserved_slot_never_filled_or_misfilled_is_refused(tiny_dirs, tmp_path):
    src = tiny_dirs["qwen3_5"]
    w = CheckpointWriter(tmp_path / "child", source_dir=src)
    with CheckpointReader(src) as r:
        names = list(r.names)[:2]
        slots = [w.reserve(n, r.dtype(n), r.shape(n)) for n in names]
        with pytest.raises(ValueError, match=f"tensor '{names[0]}': got torch.float64"):
            write_slot(slots[0], r.get(names[0]).double())
        w.fill(names[0], write_slot(slots[0], r.get(names[0])))
        with pytest.raises(KeyError, match="was not reserved"):
            w.fill(names[0], "0" * 64)
        with pytest.raises(ValueError, match="added twice"):
            w.reserve(names[1], r.dtype(names[1]), r.shape(names[1]))
    with pytest.raises(RuntimeError, match=rf"1 reserved tensor\(s\) were never filled, e.g. \['{names[1]}'\]"):
        w.commit()
    assert not (tmp_path / "child").exists() and not list(tmp_path.glob("child.tmp*"))


KILLED_WRITER = textwrap.dedent(
    """
    import os, signal, sys, torch
    from darwin_hydra.io.reader import CheckpointReader
    from darwin_hydra.io.writer import CheckpointWriter, write_slot
    src, out = sys.argv[1], sys.argv[2]
    with CheckpointReader(src) as r, CheckpointWriter(out, max_shard_bytes=20_000, source_dir=src) as w:
        for i, (name, t) in enumerate(r.iter_tensors()):
            w.fill(name, write_slot(w.reserve(name, t.dtype, t.shape), t))
            if i == len(r.names) // 2:
                w.write_text("README.md", "half a child")
                os.kill(os.getpid(), signal.SIGKILL)
    """
)


def test_killed_writer_leaves_no_finished_looking_child(tiny_dirs, tmp_path):
    src, out = tiny_dirs["qwen3_5"], tmp_path / "child"
    proc = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(src), str(out)], capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert not out.exists()
    leftovers = list(tmp_path.glob("child.tmp-*"))
    assert len(leftovers) == 1 and any(leftovers[0].glob("*.partial"))
    assert not (leftovers[0] / "model.safetensors.index.json").exists()
    with pytest.raises(FileNotFoundError):
        CheckpointReader(out)
    # The next export to the same place cleans up after the dead one.
    copy_through_writer(src, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["child"]
    assert torch.equal(logits(out), logits(src))


def test_exception_removes_temporary_directory(tiny_dirs, tmp_path):
    with pytest.raises(RuntimeError, match="merge failed"):
        with CheckpointReader(tiny_dirs["llama"]) as r, CheckpointWriter(tmp_path / "child", source_dir=r.path) as w:
            for i, (name, t) in enumerate(r.iter_tensors()):
                put(w, name, t)
                if i == 3:
                    raise RuntimeError("merge failed")
    assert list(tmp_path.iterdir()) == []


def test_existing_out_dir_refused_or_replaced(tiny_dirs, tmp_path):
    out = tmp_path / "child"
    out.mkdir()
    (out / "old.txt").write_text("previous child")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        with CheckpointWriter(out, source_dir=tiny_dirs["llama"]):
            pass
    copy_through_writer(tiny_dirs["llama"], out, overwrite=True, fsync=True)
    assert not (out / "old.txt").exists() and (out / "model.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["child"]


def test_extra_files_tokenizer_and_errors(tiny_dirs, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(tiny_dirs["llama"], src)
    (src / "tokenizer.json").write_text(json.dumps(_tokenizer_json(["a", "b", "c"])))
    (src / "tokenizer_config.json").write_text("{}")
    (src / "chat_template.jinja").write_text("{{ messages }}")
    (src / "training_args.bin").write_bytes(b"not copied")
    out = tmp_path / "child"
    with CheckpointReader(src) as r, CheckpointWriter(out, source_dir=src) as w:
        put(w, "model.embed_tokens.weight", r.get("model.embed_tokens.weight"))
        with pytest.raises(ValueError, match=r"model\.embed_tokens\.weight.*added twice"):
            put(w, "model.embed_tokens.weight", r.get("model.embed_tokens.weight"))
        with pytest.raises(ValueError, match="relative"):
            w.write_text("../escape.txt", "no")
        w.write_text("README.md", "# child\n")
        w.write_json("genome.json", {"genes": [0.5]})
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted([
        "README.md", "genome.json", "checksums.json", "config.json", "generation_config.json", "model.safetensors",
        "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
    ])
    with pytest.raises(RuntimeError, match="committed"):
        put(w, "x", torch.zeros(1))
    with pytest.raises(ValueError, match="no tensors were added"):
        with CheckpointWriter(tmp_path / "empty"):
            pass
    assert not (tmp_path / "empty").exists()


# ---- pre-merge compatibility ------------------------------------------------------------------------


def _tokenizer_json(tokens: list[str]) -> dict:
    return {
        "version": "1.0",
        "model": {"type": "WordLevel", "vocab": {t: i for i, t in enumerate(tokens)}, "unk_token": tokens[0]},
        "added_tokens": [{"id": len(tokens), "content": "<eos>", "special": True}],
    }


def test_compatible_parents_pass_from_headers_only(tiny_dirs, tmp_path, monkeypatch):
    src = tiny_dirs["qwen3_5_moe"]
    mother = copy_through_writer(src, tmp_path / "mother", max_shard_bytes=30_000)

    def no_data(self, name):
        raise AssertionError("check_compatible must not read tensor data")

    monkeypatch.setattr(CheckpointReader, "get", no_data)
    check_compatible({"father": CheckpointReader(src), "mother": CheckpointReader(mother), "base": CheckpointReader(src)})


def test_mismatched_parents_get_one_clear_error(tiny_dirs, tmp_path):
    father = tiny_dirs["llama"]
    other_vocab = save_tiny("llama", tmp_path / "vocab130", vocab_size=130)
    missing = copy_through_writer(father, tmp_path / "missing", skip={"model.layers.1.self_attn.k_proj.weight"})
    halfp = copy_through_writer(father, tmp_path / "bf16", dtype=torch.bfloat16)
    r = {p: CheckpointReader(p) for p in (father, other_vocab, missing, halfp)}

    with pytest.raises(IncompatibleParentsError) as e:
        check_compatible({"father": r[father], "mother": r[other_vocab]})
    msg = str(e.value)
    assert "config vocab_size: father 128 vs mother 130" in msg
    assert "tensor model.embed_tokens.weight: shape (128, 32) in father vs (130, 32) in mother" in msg
    assert "lm_head.weight" in msg and str(other_vocab) in msg

    with pytest.raises(IncompatibleParentsError, match=r"tensor model\.layers\.1\.self_attn\.k_proj\.weight: in father, missing from base"):
        check_compatible({"father": r[father], "mother": r[father], "base": r[missing]})

    with pytest.raises(IncompatibleParentsError, match=r"dtype float32 in father vs bfloat16 in mother"):
        check_compatible({"father": r[father], "mother": r[halfp]})

    # Another architecture: model type first, then at most 10 listed differences and a count of the rest.
    with pytest.raises(IncompatibleParentsError) as e:
        check_compatible({"father": r[father], "mother": CheckpointReader(tiny_dirs["qwen3_5"])})
    msg = str(e.value)
    assert "config model_type: father 'llama' vs mother 'qwen3_5_text'" in msg
    assert msg.count("\n  - ") == 10 and "more difference(s)" in msg
    assert len(e.value.differences) > 10


def test_tokenizer_vocabulary_mismatch(tiny_dirs, tmp_path):
    dirs = {}
    for role, tokens in (("father", ["a", "b", "c"]), ("mother", ["a", "c", "b"]), ("base", ["a", "b", "c", "d"])):
        dirs[role] = tmp_path / role
        shutil.copytree(tiny_dirs["llama"], dirs[role])
        (dirs[role] / "tokenizer.json").write_text(json.dumps(_tokenizer_json(tokens)))
    readers = {role: CheckpointReader(p) for role, p in dirs.items()}
    with pytest.raises(IncompatibleParentsError) as e:
        check_compatible(readers)
    msg = str(e.value)
    assert "tokenizer vocabulary (tokenizer.json): father and mother map token ids to different tokens" in msg
    assert "tokenizer vocabulary (tokenizer.json): father 4 tokens vs base 5" in msg
    check_compatible(readers, tokenizers=False)


# ---- pickle policy -----------------------------------------------------------------------------


class NotATensor:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_pickle_refused_unless_allowed_then_weights_only(tiny_dirs, tmp_path):
    src = tiny_dirs["llama"]
    pk = tmp_path / "pickled"
    pk.mkdir()
    shutil.copy(src / "config.json", pk / "config.json")
    sd = disk_tensors(src)
    torch.save(sd, pk / "pytorch_model.bin")
    with pytest.raises(PickleRefusedError, match=r"pytorch_model\.bin.*allow_pickle=true"):
        CheckpointReader(pk)
    with CheckpointReader(pk, allow_pickle=True) as r:
        assert r.format == "pickle" and set(r.names) == set(sd)
        assert all(torch.equal(r.get(n), sd[n]) for n in sd)
        assert r.fingerprint() == CheckpointReader(src).fingerprint()
    evil = tmp_path / "evil"
    evil.mkdir()
    shutil.copy(src / "config.json", evil / "config.json")
    torch.save({"w": torch.zeros(2), "payload": NotATensor()}, evil / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"weights_only=True\) refused"):
        CheckpointReader(evil, allow_pickle=True)


# ---- resolving models ---------------------------------------------------------------------------


def test_resolve_local_zoo_and_errors(tiny_dirs, tmp_path):
    assert resolve_model(str(tiny_dirs["llama"])) == tiny_dirs["llama"]
    assert resolve_model("zoo://father", zoo_resolver=lambda spec: tiny_dirs["llama"]) == tiny_dirs["llama"]
    (tmp_path / "noconfig").mkdir()
    with pytest.raises(ModelNotFoundError, match=r"noconfig.*no config\.json and no weights"):
        resolve_model(str(tmp_path / "noconfig"))
    with pytest.raises(ModelNotFoundError, match=r"\./not/here: no such directory"):
        resolve_model("./not/here")
    with pytest.raises(ValueError, match="zoo"):
        resolve_model("zoo://father")


def test_resolve_hub_id_through_cache_and_offline_error(tiny_dirs, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--someorg--tiny-llama"
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for f in ("config.json", "model.safetensors"):
        shutil.copy(tiny_dirs["llama"] / f, snap / f)
    assert resolve_model("someorg/tiny-llama", cache_dir=tmp_path / "hub") == snap
    with pytest.raises(ModelNotFoundError) as e:
        resolve_model("someorg/not-downloaded", cache_dir=tmp_path / "hub", allow_download=True)
    msg = str(e.value)
    assert "someorg/not-downloaded" in msg and "HF_HUB_OFFLINE" in msg and "hf download someorg/not-downloaded" in msg
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    with pytest.raises(ModelNotFoundError, match=r"someorg/not-downloaded .*\(parents\.allow_download=false\)"):
        resolve_model("someorg/not-downloaded", cache_dir=tmp_path / "hub")
