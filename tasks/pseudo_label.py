"""pseudo_label: label every train sample with the SSL model; human labels win.

Baselines (``pseudo.targets``): ``oracle`` takes the dataset's true labels for every sample (it
reads the hidden labels on purpose: it is the full-label ceiling), ``clusters`` takes k-means
clusters of the pixels' principal components (label-free; no label is read).

Params: ``base``, ``pseudo``. Outs: ``artifacts/pseudo/pseudo_labels.parquet``, ``metrics/pseudo.json``.
Hidden true labels (benchmarks only) are read for the metrics alone, after the table is built.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from semiprune_core.data.prepared import load_prepared
from semiprune_core.io import write_json, write_table
from semiprune_core.models.saved import load_model
from semiprune_core.errors import DataError
from semiprune_core.seeding import rng
from semiprune_core.ssl import PSEUDO, accuracy_report, pseudo_labels
from semiprune_core.ssl.pseudo_labels import cluster_labels, oracle_labels
from semiprune_core.training.engine import predict, resolve_device

from ._artifacts import PSEUDO_LABELS, SSL_MODEL, hidden_truth
from ._stage import StageContext, run_stage

METRICS = Path("metrics/pseudo.json")


def pseudo_label(ctx: StageContext) -> None:
    base, p = ctx.params.base, ctx.params.pseudo
    data = load_prepared()
    train = np.flatnonzero(data.split == "train")
    if p.targets == "oracle":  # the baseline that reads the truth on purpose: the ceiling to chase
        found = hidden_truth(data.sample_ids[train])
        if found is None:
            raise DataError("pseudo.targets: oracle needs a benchmark's true labels, and this dataset has none",
                            "use pseudo.targets: ssl (or clusters)")
        cols = oracle_labels(found[1])
    elif p.targets == "clusters":
        cols = cluster_labels(data.images[train], data.num_classes, rng(base.seed, "clusters"), dims=p.cluster_dims)
    else:
        model, _ = load_model(SSL_MODEL, stage="ssl_train")
        probs = predict(model, data.images[train], batch_size=p.batch_size, device=resolve_device(base.device),
                        precision=base.precision,
                        output="probs").numpy()
        cols = pseudo_labels(probs, human_labels=data.labels[train])
    table = pa.table({
        "sample_id": pa.array(data.sample_ids[train], pa.string()),
        "target": pa.array(cols["target"], pa.int16()),
        "label_source": pa.array(cols["label_source"], pa.string()),
        "pseudo_label": pa.array(cols["pseudo_label"], pa.int16()),
        "confidence": pa.array(cols["confidence"], pa.float32()),
        "margin": pa.array(cols["margin"], pa.float32()),
        "entropy": pa.array(cols["entropy"], pa.float32()),
    })
    write_table(PSEUDO_LABELS, table, meta={"params": ctx.params.to_dict(), "class_names": data.classes,
                                  "columns": {"target": "the label every later stage uses: human where labeled, else pseudo"}})
    write_json(METRICS, {**_metrics(cols, data.classes, data.sample_ids[train], p.targets), "wall_time_s": round(ctx.elapsed(), 2)})


def _metrics(cols: dict[str, np.ndarray], classes: list[str], sample_ids: np.ndarray, targets_from: str) -> dict:
    targets = cols["target"]
    out = {
        "n": int(len(targets)),
        "n_human": int((cols["label_source"] != PSEUDO).sum()),
        "n_pseudo": int((cols["label_source"] == PSEUDO).sum()),
        "targets_from": targets_from,
        "target_histogram": {name: int((targets == c).sum()) for c, name in enumerate(classes)},
        "mean_confidence_pseudo": float(cols["confidence"][cols["label_source"] == PSEUDO].mean())
        if (cols["label_source"] == PSEUDO).any() else None,
    }
    is_pseudo = cols["label_source"] == PSEUDO
    found = hidden_truth(sample_ids[is_pseudo]) if is_pseudo.any() else None
    if found is not None:  # a benchmark: judge the pseudo-labels against the hidden truth (report only)
        _, true = found
        report = accuracy_report(cols["pseudo_label"][is_pseudo], cols["confidence"][is_pseudo], true,
                                 num_classes=len(classes))
        report["per_class"] = {classes[int(c)]: v for c, v in report["per_class"].items()}
        out["pseudo_label_accuracy"] = report
    return out


def main() -> int:
    torch.set_grad_enabled(False)
    return run_stage("pseudo_label", pseudo_label)


if __name__ == "__main__":
    sys.exit(main())
