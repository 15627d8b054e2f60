"""The LMDB dataset format (the default of `mlpot data convert`): the same frames and graphs as
HDF5, end to end through conversion, lazy training (workers, two ranks), statistics, and one
clear error for a damaged file."""
from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import torch
import yaml
from ase.io import write
from test_lazy_training import _frames, _lazy_cfg, _rattled_cells

from mlpot.cli.main import main
from mlpot.data import LazyDataset, compute_statistics, read, write_hdf5, write_lmdb
from mlpot.data.frames import atoms_to_frame
from mlpot.data.lmdb_store import META_KEY, decode_frame, encode_frame, frame_key
from mlpot.data.store import shard_path
from mlpot.errors import DataError

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _same_graph(a, b):
    assert set(a) == set(b)
    for key in a:
        if torch.is_tensor(a[key]):
            assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
        else:
            assert a[key] == b[key], key


@pytest.mark.parametrize("cutoff", [None, 4.0])
def test_lmdb_and_hdf5_give_identical_frames_and_graphs(tmp_path, cutoff):
    frames = _frames(20)
    frames[5].info["weight"] = 2.5
    h = np.random.default_rng(1).normal(size=(3 * len(frames[7]),) * 2)
    frames[7].calc.results["hessian"] = h + h.T
    assert write_lmdb(frames, tmp_path / "d.lmdb", cutoff=cutoff) == len(frames)
    write_hdf5(frames, tmp_path / "d.h5", cutoff=cutoff)
    for r_max in (3.5, 4.5):  # below the stored cutoff (filtered) and above it (recomputed)
        lm, h5 = LazyDataset(tmp_path / "d.lmdb", r_max), LazyDataset(tmp_path / "d.h5", r_max)
        assert lm.stored_cutoff == h5.stored_cutoff == cutoff
        for k in range(len(frames)):
            _same_graph(lm[k], h5[k])
    back = read(tmp_path / "d.lmdb")
    for a, b in zip(frames, back):
        np.testing.assert_array_equal(a.positions, b.positions)
        np.testing.assert_array_equal(a.cell.array, b.cell.array)
        assert a.get_potential_energy() == b.get_potential_energy()
        assert ("forces" in a.calc.results) == ("forces" in b.calc.results)
        if "forces" in a.calc.results:
            np.testing.assert_array_equal(a.get_forces(), b.get_forces())
        assert a.info["config_type"] == b.info["config_type"]
    assert back[5].info["weight"] == 2.5
    np.testing.assert_array_equal(back[7].calc.results["hessian"].reshape(-1),
                                  frames[7].calc.results["hessian"].reshape(-1))


def test_convert_writes_lmdb_by_default_and_h5_when_asked(tmp_path, capsys):
    frames = _frames(11, isolated=False)
    src = tmp_path / "in.xyz"
    write(src, frames)
    out = tmp_path / "big.lmdb"
    assert main(["data", "convert", str(src), str(out), "--shard-size", "4", "--workers", "2", "--cutoff", "4.0",
                 "--no-progress"]) == 0
    shards = yaml.safe_load(capsys.readouterr().out.split("in a training config:\n", 1)[1])["data"]["train"]
    assert shards == [str(shard_path(out, k)) for k in range(3)]
    assert [len(LazyDataset(s)) for s in shards] == [4, 4, 3]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big-00000.lmdb", "big-00001.lmdb", "big-00002.lmdb",
                                                          "in.xyz"]  # no lock files, no temporary files left
    assert main(["data", "convert", str(src), str(tmp_path / "one.h5"), "--output-format", "h5"]) == 0
    assert len(LazyDataset(tmp_path / "one.h5", 3.0)) == 11
    capsys.readouterr()
    assert main(["data", "convert", str(src), str(tmp_path / "x.lmdb"), "--output-format", "h5"]) == 1
    assert "the name says lmdb but --output-format is h5" in capsys.readouterr().err
    assert main(["data", "convert", str(src), str(tmp_path / "x.data")]) == 1
    assert "ends in .lmdb" in capsys.readouterr().err
    assert not (tmp_path / "x.lmdb").exists() and not (tmp_path / "x.data").exists()


def test_failed_write_leaves_no_file_and_keeps_the_old_one(tmp_path):
    target = tmp_path / "d.lmdb"
    write_lmdb(_frames(4, isolated=False), target)
    before = target.read_bytes()

    def broken():
        yield from _frames(3, isolated=False)
        raise RuntimeError("reader failed")

    with pytest.raises(RuntimeError, match="reader failed"):
        write_lmdb(broken(), target, chunk=2)
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.lmdb"]


def test_map_grows_for_large_files(tmp_path, monkeypatch):
    """The memory map starts small and doubles until a transaction fits."""
    import mlpot.data.lmdb_store as ls

    real_open = ls._open
    monkeypatch.setattr(ls, "_open", lambda path, **kw: real_open(path, **{**kw, "map_size": 1 << 16}))
    frames = _frames(300, isolated=False)
    assert write_lmdb(frames, tmp_path / "d.lmdb") == 300
    assert (tmp_path / "d.lmdb").stat().st_size > 1 << 16
    np.testing.assert_array_equal(LazyDataset(tmp_path / "d.lmdb", 3.0).frame(299)["positions"], frames[299].positions)


def test_data_stats_on_lmdb_equals_in_memory(tmp_path, capsys):
    frames = _frames(25)
    write_lmdb(frames, tmp_path / "d.lmdb", cutoff=4.0)
    out = tmp_path / "s.json"
    assert main(["data", "stats", str(tmp_path / "d.lmdb"), "--r-max", "3.5", "--json", str(out)]) == 0
    got = json.loads(out.read_text())
    ref = compute_statistics(frames, 3.5)
    assert got["num_configs"] == ref.num_configs
    for key in ("avg_num_neighbors", "mean_interaction_energy", "std_interaction_energy", "forces_rms"):
        assert got[key] == pytest.approx(getattr(ref, key), rel=1e-9), key


def _edit(path, fn):
    import lmdb

    env = lmdb.open(str(path), subdir=False, lock=False)
    with env.begin(write=True) as txn:
        fn(txn)
    env.close()


def _stats_error(path, capsys):
    assert main(["data", "stats", str(path), "--r-max", "3.0"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert str(path) in err
    return err


def test_damaged_lmdb_files_give_one_line_naming_file_and_frame(tmp_path, capsys):
    frames = _frames(8, isolated=False)
    p = tmp_path / "d.lmdb"

    junk = tmp_path / "junk.lmdb"
    junk.write_bytes(b"this is not an LMDB file" * 300)
    assert "not a readable LMDB file" in _stats_error(junk, capsys)

    write_lmdb(frames, p)
    _edit(p, lambda txn: txn.delete(frame_key(3)))
    assert "frame 3: missing" in _stats_error(p, capsys)

    write_lmdb(frames, p)
    _edit(p, lambda txn: txn.put(frame_key(5), txn.get(frame_key(5))[:-7]))
    assert "frame 5: damaged record" in _stats_error(p, capsys)

    bad = atoms_to_frame(frames[2])
    bad["forces"][1, 2] = np.nan
    write_lmdb(frames, p)
    _edit(p, lambda txn: txn.put(frame_key(2), encode_frame(bad)))
    assert "frame 2: forces not finite" in _stats_error(p, capsys)

    write_lmdb(frames, p)
    _edit(p, lambda txn: txn.delete(META_KEY))
    assert "not an mlpot dataset file" in _stats_error(p, capsys)

    # training stops before its first step, with the same line
    write_lmdb(frames, p)
    _edit(p, lambda txn: txn.put(frame_key(2), encode_frame(bad)))
    cfg = _lazy_cfg(tmp_path, "run", str(p), 0.25, epochs=1)
    assert main(["train", str(cfg)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{p}: frame 2: forces not finite" in err, err
    assert not (tmp_path / "run" / "model.pt").exists()


def test_decode_rejects_records_it_cannot_account_for():
    rec = encode_frame(atoms_to_frame(_frames(1, isolated=False)[0], cutoff=4.0))
    assert decode_frame(rec)["positions"].flags.writeable  # torch.as_tensor warns on read-only arrays
    for damaged in (rec[:3], rec + b"\0", struct.pack("<I", 10**6) + rec[4:]):
        with pytest.raises(DataError, match=r"f\.lmdb: frame 7: damaged record"):
            decode_frame(damaged, "f.lmdb", 7)


def test_two_readers_and_forked_workers_share_one_file(tmp_path):
    """py-lmdb refuses to open one file twice in a process: readers share it, and forked
    DataLoader workers each open their own after the parent has it open."""
    from mlpot.data import make_dataloader
    from mlpot.data.dataset import ShardedDataset

    p = tmp_path / "d.lmdb"
    write_lmdb(_frames(12, isolated=False), p, cutoff=4.0)
    a, b = LazyDataset(p), LazyDataset(p)
    assert a[3]["positions"].shape == b[3]["positions"].shape  # both open in this process
    ds = ShardedDataset([p, p], 4.0)
    n_atoms = sum(len(g["positions"]) for g in make_dataloader(ds, 5, num_workers=2))
    assert n_atoms == 2 * sum(len(a.frame(k)["numbers"]) for k in range(12))
    a.close()
    assert b[11]["positions"].shape[1] == 3  # still open for the other reader


def test_two_gloo_ranks_on_lmdb_equal_single_process(tmp_path):
    """The distributed sampler shards the lazy frames: two ranks with batch b train exactly as
    one process with batch 2b."""
    import torch.multiprocessing as mp
    from test_distributed import _free_port, _worker
    from test_train_helpers import toy_config

    from mlpot.train import train
    from mlpot.train.config import validate_config

    # equal atom counts: a per-rank mean over atoms then equals the global one
    write_lmdb(_rattled_cells(16, 1, seed=1), tmp_path / "t.lmdb", cutoff=4.0)
    write_lmdb(_rattled_cells(5, 1, seed=2), tmp_path / "v.lmdb")

    def raw(out, batch_size):
        cfg = toy_config(out, epochs=1, batch_size=batch_size, ema=False, clip_grad=None, lr=0.02,
                         scheduler="none")
        cfg["data"] = {"train": str(tmp_path / "t.lmdb"), "valid": str(tmp_path / "v.lmdb")}
        return cfg

    train(validate_config(raw(tmp_path / "single", 4)), log=lambda m: None)
    mp.spawn(_worker, args=(2, _free_port(), raw(tmp_path / "ddp", 2)), nprocs=2, join=True)
    a = torch.load(tmp_path / "single" / "model.pt", weights_only=True)["state_dict"]
    d = torch.load(tmp_path / "ddp" / "model.pt", weights_only=True)["state_dict"]
    for k in a:
        assert torch.allclose(a[k], d[k], rtol=0, atol=1e-10), k
    ma = json.loads((tmp_path / "single" / "metrics.json").read_text())
    md = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    for split in ("train", "valid"):
        assert md[split]["n_configs"] == ma[split]["n_configs"] == {"train": 16, "valid": 5}[split]
        assert md[split]["f_mae"] == pytest.approx(ma[split]["f_mae"], rel=1e-9)
