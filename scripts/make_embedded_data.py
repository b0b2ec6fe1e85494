#!/usr/bin/env python
"""Build the small FMNIST benchmark subset shipped in ``posthoc/data/embedded/``.

From the full, md5-checked idx files it draws fixed, class-stratified subsets:

- train:   4,000 Fashion-MNIST training images (400/class) from those NOT in
           the 5,000-image validation split of ``fmnist_suite()`` (seed 0);
- val:     1,000 (100/class) from that validation split;
- test:    2,000 Fashion-MNIST test images (200/class);
- context: 1,000 MNIST training images (100/class);
- ood:     2,000 KMNIST test images (200/class).

Writes ``fmnist_small.npz`` (uint8 images and labels, int64 source indices),
``manifest.json`` and ``LICENSES.md``, each atomically. The npz is written
with fixed zip timestamps, so re-running on the same data gives identical bytes.

Usage: python scripts/make_embedded_data.py [--data-dir DIR] [--out DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import sys
import zipfile
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
try:
    import posthoc  # noqa: F401
except ImportError:  # running from a checkout without installing
    sys.path.insert(0, str(REPO_ROOT / "src"))

from posthoc.data.idx import file_md5  # noqa: E402
from posthoc.data.splits import stratified_split  # noqa: E402
from posthoc.data.suites import EMBEDDED_NPZ, SUITE_ROLES  # noqa: E402
from posthoc.data.vision import VISION_FILES, load_raw_arrays, vision_file_path  # noqa: E402
from posthoc.utils.io import atomic_write_bytes, atomic_write_text  # noqa: E402

VAL_SIZE, VAL_SEED = 5000, 0  # must equal fmnist_suite()'s defaults
# role -> (source data set, source split, subset size, seed of the stratified draw)
PLAN: dict[str, tuple[str, str, int, int]] = {
    "train": ("FashionMNIST", "train", 4000, 1),
    "val": ("FashionMNIST", "train", 1000, 2),
    "test": ("FashionMNIST", "test", 2000, 3),
    "context": ("MNIST", "train", 1000, 4),
    "ood": ("KMNIST", "test", 2000, 5),
}


def choose_indices(labels: dict[tuple[str, str], np.ndarray]) -> dict[str, np.ndarray]:
    """Row indices into each role's source split (sorted int64)."""
    fm_labels = labels[("FashionMNIST", "train")]
    keep, val = stratified_split(fm_labels, VAL_SIZE, VAL_SEED)
    pools = {"train": keep, "val": val}
    out = {}
    for role, (name, split, size, seed) in PLAN.items():
        pool = pools.get(role, np.arange(labels[(name, split)].shape[0]))
        _, sub = stratified_split(labels[(name, split)][pool], size, seed)
        out[role] = pool[sub]
    return out


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """An ``.npz`` (as np.savez_compressed writes) with fixed timestamps and deflate level 9."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED, allowZip64=True) as zf:
        for key in sorted(arrays):
            member = io.BytesIO()
            np.lib.format.write_array(member, np.ascontiguousarray(arrays[key]), allow_pickle=False)
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            zf.writestr(info, member.getvalue(), compress_type=zipfile.ZIP_DEFLATED, compresslevel=9)
    return buf.getvalue()


LICENSES_TEMPLATE = """# Licences of the embedded data

`fmnist_small.npz` holds **subsets** of three published data sets, stored as the
original 8-bit pixels and labels (no other change). They were drawn by
`scripts/make_embedded_data.py` from the original idx `.gz` files (md5-checked
against the published sums, listed in `manifest.json`) as fixed class-stratified
random samples (`numpy.random.default_rng`, seeds in `manifest.json`):

- train: 4,000 Fashion-MNIST training images (400 per class), from the training
  images outside the package's 5,000-image validation split (seed 0);
- val: 1,000 Fashion-MNIST training images (100 per class) from that validation split;
- test: 2,000 Fashion-MNIST test images (200 per class);
- context: 1,000 MNIST training images (100 per class);
- ood: 2,000 KMNIST test images (200 per class).

The row of every image in its source file is stored beside it (`<role>_index`).

## Fashion-MNIST (train, val, test)

Fashion-MNIST by Zalando Research, https://github.com/zalandoresearch/fashion-mnist.
Han Xiao, Kashif Rasul, Roland Vollgraf: "Fashion-MNIST: a Novel Image Dataset for
Benchmarking Machine Learning Algorithms", arXiv:1708.07747 (2017).
Licence: MIT, Copyright (c) 2017 Zalando SE. Licence text:

```
{fmnist_license}
```

## MNIST (context)

The MNIST database of handwritten digits, Copyright (c) Yann LeCun and Corinna Cortes
(with Christopher J.C. Burges), derived from NIST Special Databases 1 and 3.
Licence: Creative Commons Attribution-Share Alike 3.0 (CC BY-SA 3.0),
https://creativecommons.org/licenses/by-sa/3.0/. The subset here is an adaptation
(a selection of images) and is shared under the same licence.

## KMNIST (ood)

"KMNIST Dataset" (created by CODH), adapted from "Kuzushiji Dataset" (created by NIJL
and others), doi:10.20676/00000341. Tarin Clanuwat et al.: "Deep Learning for Classical
Japanese Literature", arXiv:1812.01718 (2018).
Licence: Creative Commons Attribution-ShareAlike 4.0 International (CC BY-SA 4.0),
https://creativecommons.org/licenses/by-sa/4.0/. The subset here is an adaptation
(a selection of test images) and is shared under the same licence.
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=REPO_ROOT.parent / "shared" / "data",
                        help="root holding FashionMNIST/, MNIST/, KMNIST/ (default: ../shared/data from the repo root)")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "src" / "posthoc" / "data" / "embedded",
                        help="output folder (default: src/posthoc/data/embedded/)")
    args = parser.parse_args(argv)

    sources = sorted({(name, split) for name, split, _, _ in PLAN.values()})
    raw = {src: load_raw_arrays(*src, data_dir=args.data_dir) for src in sources}
    indices = choose_indices({src: lab for src, (_, lab) in raw.items()})

    arrays: dict[str, np.ndarray] = {}
    for role in SUITE_ROLES:
        name, split, _, _ = PLAN[role]
        images, labels = raw[(name, split)]
        idx = indices[role]
        arrays[f"{role}_images"] = images[idx]
        arrays[f"{role}_labels"] = labels[idx]
        arrays[f"{role}_index"] = idx.astype(np.int64)
    payload = npz_bytes(arrays)

    source_files = {}
    for name, split in sources:
        for kind in ("images", "labels"):
            path = vision_file_path(name, split, kind, args.data_dir)
            spec = VISION_FILES[(name, split, kind)]
            source_files[f"{name}/raw/{spec.filename}"] = {"md5": file_md5(path), "url": spec.url}

    manifest = {
        "file": EMBEDDED_NPZ,
        "bytes": len(payload),
        "sha256": hashlib.sha256(payload).hexdigest(),
        "generator": "scripts/make_embedded_data.py",
        "arrays": "<role>_images uint8 (N,28,28), <role>_labels uint8 (N,), "
                  "<role>_index int64 (N,): row of each image in its source split",
        "validation_split": {
            "source": "FashionMNIST train (60000)",
            "method": "posthoc.data.stratified_split(labels, n_holdout, seed)",
            "n_holdout": VAL_SIZE,
            "seed": VAL_SEED,
            "note": "same split as posthoc.data.fmnist_suite() with its defaults",
        },
        "roles": {
            role: {
                "source": f"{PLAN[role][0]} {PLAN[role][1]}",
                "count": int(indices[role].size),
                "per_class": np.bincount(arrays[f"{role}_labels"], minlength=10).tolist(),
                "seed": PLAN[role][3],
                "drawn_from": {
                    "train": f"the {60000 - VAL_SIZE} FashionMNIST train rows outside the validation split",
                    "val": f"the {VAL_SIZE} FashionMNIST train rows of the validation split",
                }.get(role, f"all rows of {PLAN[role][0]} {PLAN[role][1]}"),
                "method": "stratified_split(pool_labels, count, seed); index = pool[holdout], sorted",
            }
            for role in SUITE_ROLES
        },
        "source_files": source_files,
    }

    fmnist_license = (args.data_dir / "FashionMNIST" / "LICENSE").read_text(encoding="utf-8").strip()
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(args.out / EMBEDDED_NPZ, payload)
    atomic_write_text(args.out / "manifest.json", json.dumps(manifest, indent=2) + "\n")
    atomic_write_text(args.out / "LICENSES.md", LICENSES_TEMPLATE.format(fmnist_license=fmnist_license))
    print(f"wrote {args.out / EMBEDDED_NPZ} ({len(payload):,} bytes), manifest.json, LICENSES.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
