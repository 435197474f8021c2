"""`python -m scaletune.predict MODEL_DIR --test_file data.csv [--output_file preds.csv]`

Predictions for new data with a model exported by `scaletune.train` (or any sequence-classification
`save_pretrained` folder): one row per example with its id, the predicted label and every label's
probability -- the tutorial's `trainer.predict(test)` step as a command.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def predict(model_dir: str, test_file: str, output_file: str | None = None, text_column_names: str | None = None,
            max_seq_length: int | None = None, batch_size: int = 32) -> str:
    from .config import load_config
    from .data import DataError, load_raw_datasets
    from .tasks import get_task

    if not (Path(model_dir) / "config.json").is_file():
        raise DataError(f"{model_dir!r} is not a model folder (no config.json); pass the output_dir of a run.")
    cfg = load_config({"model_name_or_path": model_dir, "test_file": test_file, "do_train": False,
                       "validation_split_percentage": 0, "text_column_names": text_column_names,
                       "max_seq_length": max_seq_length, "per_device_eval_batch_size": batch_size})

    import numpy as np
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    task = get_task("classification")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    raw = load_raw_datasets(cfg)
    # Labels (if the file has any) are not needed to predict; the model's own label map is authoritative.
    if cfg.data.label_column_name in raw["test"].column_names:
        raw["test"] = raw["test"].remove_columns(cfg.data.label_column_name)
    text_cols = task.text_columns(raw["test"].column_names, cfg)
    max_len = min(max_seq_length or 128, tokenizer.model_max_length)
    collate = task.collator(tokenizer, cfg, for_training=False)
    rows = raw["test"]
    logits = []
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            part = rows[start:start + batch_size]
            enc = tokenizer(*[part[c] for c in text_cols], truncation=True, max_length=max_len)
            batch = collate([{k: enc[k][i] for k in enc} for i in range(len(part[text_cols[0]]))])
            logits.append(model(**batch).logits.float().numpy())
    id_col = next((c for c in ("id", "idx", "guid") if c in rows.column_names), None)
    ids = list(rows[id_col]) if id_col else list(range(len(rows)))
    output_file = output_file or str(Path(model_dir) / "predictions_new.csv")
    from .tasks.classification import write_prediction_file

    write_prediction_file(output_file, np.concatenate(logits), ids, model.config.id2label)
    return output_file


def main(argv=None) -> int:
    if any(a in ("-h", "--help") for a in (sys.argv[1:] if argv is None else argv)):
        from .config import help_text  # generated from predict()'s signature: the options below mirror it

        print(help_text("scaletune.predict"))
        return 0
    p = argparse.ArgumentParser(prog="python -m scaletune.predict", description=__doc__.strip().splitlines()[2])
    p.add_argument("model_dir")
    p.add_argument("--test_file", required=True)
    p.add_argument("--output_file")
    p.add_argument("--text_column_names")
    p.add_argument("--max_seq_length", type=int)
    p.add_argument("--batch_size", type=int, default=32)
    args = p.parse_args(argv)
    from .config import ConfigError
    from .data import DataError

    try:
        out = predict(args.model_dir, args.test_file, args.output_file, args.text_column_names,
                      args.max_seq_length, args.batch_size)
    except (ConfigError, DataError) as e:
        print(f"scaletune.predict: error: {e}", file=sys.stderr)
        return 2
    print(f"Predictions written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
