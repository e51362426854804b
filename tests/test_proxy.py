"""Phase-1 proxy: left-padded batches score like unpadded prompts, the teacher's greedy answers equal
transformers' greedy generation, the MRI's teacher assignment is followed, and the KL counts only
answer tokens."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from darwin_hydra.search.proxy import TeacherKLProxy, _batch, greedy_answers, logprobs
from darwin_hydra.zoo.tokenizer import char_tokenizer

PROMPTS = ["12+34=", "rev:abcdef=", "sort:93=", "map:zz="]


def _model(seed: int, tok) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


def test_left_padded_logprobs_equal_each_prompt_alone(tok):
    model = _model(0, tok)
    batch = _batch(tok, PROMPTS, 64)
    assert (batch.attention_mask[:, -1] == 1).all()  # left padding: every prompt ends at the last column
    lp = logprobs(model, batch)
    # keep=k: the model computes only the last k positions' logits, and they are the same numbers
    torch.testing.assert_close(logprobs(model, batch, keep=3), lp[:, -3:], atol=1e-5, rtol=1e-4)
    for i, text in enumerate(PROMPTS):
        alone = _batch(tok, [text], 64)
        n = alone.input_ids.shape[1]
        torch.testing.assert_close(lp[i, -(n - 1):], logprobs(model, alone)[0], atol=1e-5, rtol=1e-4)


def test_greedy_answers_equal_generate_and_stop_at_eos(tok):
    model = _model(1, tok)
    batch = _batch(tok, PROMPTS, 64)
    ext, predicts = greedy_answers(lambda b, keep=0: logprobs(model, b, keep), batch, 5, tok.eos_token_id, tok.pad_token_id)
    T = batch.input_ids.shape[1]
    assert predicts[:, : T - 1].sum() == 0  # prompt positions are never scored
    for i, text in enumerate(PROMPTS):
        alone = tok([text], return_tensors="pt")
        gen = model.generate(**alone, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)[0, alone.input_ids.shape[1]:]
        n_answer = int(predicts[i].sum())
        ours = ext.input_ids[i, T : T + n_answer]
        assert ours.tolist() == gen[:n_answer].tolist()
        # scored up to and including an end-of-sequence token, nothing after it
        if tok.eos_token_id in ours.tolist():
            assert ours.tolist().index(tok.eos_token_id) == n_answer - 1
        else:
            assert n_answer == 5


@pytest.mark.parametrize("answer_tokens", [0, 4])
def test_proxy_follows_the_assigned_teacher(tok, answer_tokens):
    father, mother = _model(2, tok), _model(3, tok)
    prompts = {"MATH": PROMPTS[:2], "LANGUAGE": PROMPTS[2:]}
    proxy = TeacherKLProxy(tok, prompts, lambda b, keep=0: logprobs(father, b, keep), lambda b, keep=0: logprobs(mother, b, keep),
                           teacher_of={"MATH": "mother", "LANGUAGE": "father"}, answer_tokens=answer_tokens)
    assert proxy.teacher_of == {"MATH": "mother", "LANGUAGE": "father"}
    math = proxy.teachers["MATH"]
    if answer_tokens:
        assert int(math.mask.sum()) <= answer_tokens * len(prompts["MATH"])
        assert math.mask.shape[1] == proxy.keep["MATH"] <= answer_tokens  # only answer positions are kept
    # a child equal to the teacher of a set has KL 0 there; the other parent does not
    single = TeacherKLProxy(tok, {"MATH": prompts["MATH"]}, lambda b, keep=0: logprobs(father, b, keep), lambda b, keep=0: logprobs(mother, b, keep),
                            teacher_of={"MATH": "mother"}, answer_tokens=answer_tokens, top_k=len(tok))
    assert single.score(mother) == pytest.approx(0.0, abs=1e-5)
    assert single.score(father) < -1e-3
    with pytest.raises(ValueError, match="father' or 'mother"):
        TeacherKLProxy(tok, prompts, lambda b, keep=0: logprobs(father, b, keep), lambda b, keep=0: logprobs(mother, b, keep), teacher_of={"MATH": "uncle"})
