"""Masked-LM test inputs shared by the unit and end-to-end MLM tests: the real MiniLM tokenizer, real short
texts from the packaged Rotten Tomatoes corpus, and scaletune's content-seeded masking collator."""

from __future__ import annotations

MINILM = "packaged:minilm"


def minilm_tokenizer():
    from transformers import AutoTokenizer

    from scaletune.assets import model_path

    return AutoTokenizer.from_pretrained(model_path(MINILM))


def rotten_texts(n: int) -> list[str]:
    """Real short texts (movie reviews) from the packaged Rotten Tomatoes corpus."""
    import csv

    from scaletune.assets import dataset_files

    with open(dataset_files("packaged:rotten_tomatoes")["train"], newline="") as f:
        return [r["text"] for _, r in zip(range(n), csv.DictReader(f))]


def mlm_collator(tokenizer, **kw):
    from scaletune.tasks.mlm import ContentSeededMLMCollator

    return ContentSeededMLMCollator(tokenizer=tokenizer, mlm_probability=kw.pop("mlm_probability", 0.15),
                                    seed=kw.pop("seed", 42), **kw)


def line_examples(tokenizer, texts):
    enc = tokenizer(texts, truncation=True, max_length=64, return_special_tokens_mask=True)
    return [{k: enc[k][i] for k in enc} for i in range(len(texts))]
