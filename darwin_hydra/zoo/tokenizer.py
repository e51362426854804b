"""A character-level tokenizer for the zoo, built with ``tokenizers`` and saved as a normal HF tokenizer.

One token per character of ``ALPHABET`` plus ``<pad> <s> </s> <unk>``; ``<s>`` is prepended by the
post-processor (as Llama's tokenizer does), so lm-eval, the MRI probes and training all see the same
ids for the same text.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, processors
from transformers import PreTrainedTokenizerFast

from darwin_hydra.zoo.skills import ALPHABET

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIALS = (PAD, BOS, EOS, UNK)


def char_tokenizer(alphabet: str = ALPHABET) -> PreTrainedTokenizerFast:
    """A fast tokenizer with one id per character: ids 0-3 are ``<pad> <s> </s> <unk>``, then ``alphabet``.

    A BPE model with no merges splits text into single characters; ``decoders.Fuse`` joins them back
    without spaces.
    """
    if len(set(alphabet)) != len(alphabet):
        raise ValueError("tokenizer alphabet has repeated characters")
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    vocab.update({ch: len(SPECIALS) + i for i, ch in enumerate(alphabet)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK))
    tok.add_special_tokens(list(SPECIALS))
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        model_max_length=128,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
