import gzip
import pickle
import struct

import numpy as np
import pytest
import torch

from bnn_tol import data


def _write_idx(path, arr: np.ndarray, code=0x08, gz=True):
    header = bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    payload = header + arr.astype(">u1" if code == 0x08 else arr.dtype).tobytes()
    if gz:
        with gzip.open(str(path) + ".gz", "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)


def _fake_mnist(d, n=20, gz=True):
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    lbls = rng.integers(0, 10, n).astype(np.uint8)
    for split, (si, sl) in {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                            "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}.items():
        del split
        _write_idx(d / si, imgs, gz=gz)
        _write_idx(d / sl, lbls, gz=gz)
    return imgs, lbls


@pytest.mark.parametrize("gz", [True, False])
def test_idx_roundtrip_gzipped_or_not(tmp_path, gz):
    imgs, lbls = _fake_mnist(tmp_path, gz=gz)
    ds = data.load("mnist", "test", data_dir=tmp_path)
    assert ds.images.shape == (20, 1, 28, 28)
    assert torch.equal(ds.images[:, 0], torch.from_numpy(imgs))
    assert ds.labels.tolist() == lbls.tolist()


def test_truncated_idx_gives_clear_error(tmp_path):
    imgs, _ = _fake_mnist(tmp_path, gz=False)
    raw = (tmp_path / "t10k-images-idx3-ubyte").read_bytes()
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(raw[:-100])
    with pytest.raises(data.CorruptDataset, match="truncated"):
        data.load("mnist", "test", data_dir=tmp_path)


def test_bad_magic_and_corrupt_gzip_give_clear_errors(tmp_path):
    (tmp_path / "x").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(data.CorruptDataset, match="magic"):
        data.read_idx(tmp_path / "x")
    (tmp_path / "y.gz").write_bytes(b"not gzip at all")
    with pytest.raises(data.CorruptDataset, match="corrupt"):
        data.read_idx(tmp_path / "y.gz")


def test_missing_dataset_says_where_it_looked_and_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("BNN_TOL_DATA", str(tmp_path / "env"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(data.DatasetNotFound) as e:
        data.load("kmnist", "train")
    msg = str(e.value)
    assert str(tmp_path / "env") in msg and "data/kmnist" in msg
    assert "/usr/share/datasets/kmnist" in msg and "--data-dir" in msg


def test_a_given_data_dir_is_the_only_place_searched(tmp_path, monkeypatch):
    """Issue 9: a nonexistent or empty --data-dir used to fall back to other copies silently."""
    (tmp_path / "env").mkdir()
    _fake_mnist(tmp_path / "env")
    monkeypatch.setenv("BNN_TOL_DATA", str(tmp_path / "env"))
    assert len(data.load("mnist", "test")) == 20
    with pytest.raises(data.DatasetNotFound, match="does not exist"):
        data.load("mnist", "test", data_dir=tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(data.DatasetNotFound) as e:
        data.load("mnist", "test", data_dir=tmp_path / "empty")
    msg = str(e.value)
    assert str(tmp_path / "empty" / "mnist") in msg and str(tmp_path / "env") not in msg


def test_idx_labels_outside_the_class_range_are_refused(tmp_path):
    _fake_mnist(tmp_path)
    for bad in (10, 255):
        lbls = np.zeros(20, dtype=np.uint8)
        lbls[7] = bad
        _write_idx(tmp_path / "t10k-labels-idx1-ubyte", lbls)
        with pytest.raises(data.CorruptDataset, match=f"0..9, found 0..{bad}"):
            data.load("mnist", "test", data_dir=tmp_path)


def test_unknown_dataset_and_split():
    with pytest.raises(ValueError, match="available"):
        data.load("imagenet")
    with pytest.raises(ValueError, match="split"):
        data.load("digits", "validation")


def test_cifar10_batches_load_without_executing_code(tmp_path):
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    rng = np.random.default_rng(1)
    for name in ["test_batch"] + [f"data_batch_{i}" for i in range(1, 6)]:
        batch = {b"data": rng.integers(0, 256, (7, 3072), dtype=np.uint8),
                 b"labels": rng.integers(0, 10, 7).tolist()}
        (d / name).write_bytes(pickle.dumps(batch))
    ds = data.load("cifar10", "train", data_dir=tmp_path)
    assert ds.images.shape == (35, 3, 32, 32) and len(ds.classes) == 10

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (d / "test_batch").write_bytes(pickle.dumps({b"data": Evil(), b"labels": []}))
    with pytest.raises(data.CorruptDataset, match="refusing"):
        data.load("cifar10", "test", data_dir=tmp_path)


def test_digits_is_a_fixed_split():
    tr, te = data.load("digits", "train"), data.load("digits", "test")
    assert len(tr) + len(te) == 1797 and tr.shape == (1, 8, 8)
    assert torch.equal(data.load("digits", "test").images, te.images)


def test_batches_shuffle_is_seeded_and_covers_every_sample():
    ds = data.load("digits", "test")
    ys1 = torch.cat([y for _, y in ds.batches(50, shuffle=True, seed=3)])
    ys2 = torch.cat([y for _, y in ds.batches(50, shuffle=True, seed=3)])
    ys3 = torch.cat([y for _, y in ds.batches(50, shuffle=True, seed=4)])
    assert torch.equal(ys1, ys2) and not torch.equal(ys1, ys3)
    assert sorted(ys1.tolist()) == sorted(ds.labels.tolist())
    with pytest.raises(ValueError, match="seed"):
        next(ds.batches(10, shuffle=True))


def test_input_scaling_is_dyadic_so_first_layer_sums_are_exact_in_any_order():
    p = torch.randint(0, 256, (784,), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    x = data.to_float(p[None, None, None, :])[0, 0, 0]
    w = torch.where(torch.rand(784, generator=torch.Generator().manual_seed(1)) < 0.5, -1.0, 1.0)
    exact = float((w.double() * (p.double() - 128)).sum() / 128)
    forward = float((w * x).sum())
    backward = float((w * x).flip(0).cumsum(0)[-1])
    assert forward == backward == exact


def test_fashion_mnist_if_installed():
    try:
        te = data.load("fashion-mnist", "test")
    except data.DatasetNotFound:
        pytest.skip("fashion-mnist not installed")
    assert len(te) == 10000 and te.shape == (1, 28, 28)
    assert te.classes[0] == "T-shirt/top"
    assert torch.bincount(te.labels).tolist() == [1000] * 10
