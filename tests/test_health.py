"""Health-check flags on hand-made importance curves."""

from darwin_hydra.health import health_check

F = {"MATH": [0.10, 0.30, 0.05, 0.20], "CODE": [0.1, 0.1, 0.1, 0.1]}
M = {"MATH": [0.12, 0.25, 0.06, 0.40], "CODE": [0.1, 0.1, 0.1, 0.1]}


def test_child_between_parents_is_healthy():
    child = {"MATH": [0.11, 0.27, 0.05, 0.30], "CODE": [0.1, 0.1, 0.1, 0.1]}
    rep = health_check(child, F, M)
    assert rep.verdict == "healthy" and rep.flags == []


def test_zeroed_layer_is_function_loss_and_spike_is_interference():
    child = {"MATH": [0.11, 0.0, 0.30, 0.30], "CODE": [0.1, 0.001, 0.1, 0.1]}
    rep = health_check(child, F, M)
    assert rep.verdict == "flagged"
    kinds = {(f.kind, f.probe_set, f.layer) for f in rep.flags}
    assert ("function_loss", "MATH", 1) in kinds and ("function_loss", "CODE", 1) in kinds
    assert ("interference", "MATH", 2) in kinds
    assert rep.flagged_layers == [1, 2]
    assert "layer 1" in rep.flags[0].describe()


def test_thresholds_are_respected():
    child = {"MATH": [0.11, 0.27, 0.09, 0.30], "CODE": [0.1, 0.1, 0.1, 0.1]}
    # 0.09 < 2 * 0.06: no interference at the default factor; flagged with factor 1.2
    assert health_check(child, F, M).verdict == "healthy"
    assert health_check(child, F, M, interference_factor=1.2).flagged_layers == [2]


def test_planted_fault_a_zeroed_layer_is_flagged_as_function_loss():
    """A child whose layer 2 is zeroed (attention and MLP outputs: the layer becomes the identity) is
    flagged at layer 2 by the probe-scan health check against both parents."""
    import torch

    from darwin_hydra.mri.probes import layer_importance
    from darwin_hydra.testing.tiny import tiny_model

    torch.manual_seed(0)
    father = tiny_model("llama", seed=0, num_layers=6)
    mother = tiny_model("llama", seed=0, num_layers=6)
    with torch.no_grad():
        for p in mother.parameters():
            p.add_(0.01 * torch.randn_like(p))
    child = tiny_model("llama", seed=0, num_layers=6)
    with torch.no_grad():
        child.model.layers[2].self_attn.o_proj.weight.zero_()
        child.model.layers[2].mlp.down_proj.weight.zero_()

    class Tok:  # ids straight from the prompt's characters: a tokenizer without files
        pad_token_id, eos_token_id, padding_side = 0, 0, "right"

        def __call__(self, texts, **kw):
            n = max(len(t) for t in texts)
            ids = torch.tensor([[ord(c) % 120 + 1 for c in t] + [0] * (n - len(t)) for t in texts])
            mask = torch.tensor([[1] * len(t) + [0] * (n - len(t)) for t in texts])
            return {"input_ids": ids, "attention_mask": mask}

    prompts = {"MATH": ["12+34=", "7+8=", "100+23="], "LANGUAGE": ["hello", "reverse me", "abc"]}
    imp = {k: layer_importance(m, Tok(), prompts, progress=False).importance
           for k, m in (("father", father), ("mother", mother), ("child", child))}
    rep = health_check(imp["child"], imp["father"], imp["mother"])
    lost = {(f.probe_set, f.layer) for f in rep.flags if f.kind == "function_loss"}
    assert ("MATH", 2) in lost and ("LANGUAGE", 2) in lost
    assert all(layer == 2 for _, layer in lost)
