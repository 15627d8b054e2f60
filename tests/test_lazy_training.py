"""Training from HDF5 files without loading them: streamed statistics (cached), sharded
conversion, `mlpot train` on shards equal to in-memory training, and bounded memory."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import yaml
from ase import Atoms
from ase.calculators.singlepoint import SinglePointCalculator
from ase.io import write
from test_train_helpers import SUBPROCESS_PROLOGUE, toy_config, write_config

from mlpot.cli.main import main
from mlpot.data import LazyDataset, compute_statistics, read, write_dataset, write_hdf5
from mlpot.data import streaming_stats as ss
from mlpot.data.hdf5 import iter_hdf5_atoms

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _frames(n, seed=0, isolated=True):
    """Small Cu/Ni clusters and bulk cells with made-up (finite, varied) labels."""
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        nat = int(rng.integers(2, 6))
        numbers = rng.choice([28, 29], size=nat)
        pos = rng.uniform(0, 3.5, size=(nat, 3))
        periodic = k % 3 == 0
        a = Atoms(numbers=numbers, positions=pos, cell=np.eye(3) * 4.0 if periodic else None, pbc=periodic)
        e = float(-3.5 * (numbers == 29).sum() - 4.2 * (numbers == 28).sum() + rng.normal(0, 0.1))
        res = {"energy": e, "forces": rng.normal(0, 0.3, size=(nat, 3))}
        if periodic:
            res["stress"] = rng.normal(0, 0.01, size=6)
        a.calc = SinglePointCalculator(a, **res)
        a.info["config_type"] = "bulk" if periodic else "cluster"
        out.append(a)
    if isolated:
        for z, e in ((29, -0.3), (28, -0.5)):
            a = Atoms(numbers=[z], positions=[[0, 0, 0]], pbc=False)
            a.calc = SinglePointCalculator(a, energy=e)
            a.info["config_type"] = "IsolatedAtom"
            out.insert(3, a)
    return out


@pytest.mark.parametrize("stored_cutoff", [None, 5.0])
def test_streamed_statistics_equal_in_memory(tmp_path, stored_cutoff):
    frames = _frames(40)
    halves = (frames[:17], frames[17:])
    paths = [tmp_path / f"s{k}.h5" for k in range(2)]
    for p, part in zip(paths, halves):
        write_hdf5(part, p, cutoff=stored_cutoff)
    m = ss.file_moments(paths[0], 3.5, log=lambda *_: None).merge(ss.file_moments(paths[1], 3.5, log=lambda *_: None))
    assert m.n_stress == sum("stress" in a.calc.results for a in frames)
    assert [r[1] for r in m.isolated] == [28, 29]  # both inserted at index 3
    for e0s in ("fit", {28: -4.0, 29: -3.0}):
        ref = compute_statistics(frames, 3.5, e0s=e0s)
        got = ss.finalize_statistics(m, e0s=e0s)
        assert got.num_configs == ref.num_configs == 40 and got.num_atoms == ref.num_atoms
        assert got.species == ref.species
        for z in ref.e0s:
            assert got.e0s[z] == pytest.approx(ref.e0s[z], rel=1e-9, abs=1e-9)
        for key in ("avg_num_neighbors", "mean_interaction_energy", "std_interaction_energy", "forces_rms"):
            assert getattr(got, key) == pytest.approx(getattr(ref, key), rel=1e-9, abs=1e-12), key


def test_statistics_cache_is_reused_and_keyed_by_content_and_cutoff(tmp_path, monkeypatch):
    p = tmp_path / "d.h5"
    write_hdf5(_frames(10), p)
    calls = []
    real_scan = ss._scan
    monkeypatch.setattr(ss, "_scan", lambda ds, label: calls.append(ds.cutoff) or real_scan(ds, label))
    quiet = dict(log=lambda *_: None)
    first = ss.file_moments(p, 3.0, **quiet)
    cache = tmp_path / ("d.h5" + ss.CACHE_SUFFIX)
    assert cache.exists() and json.loads(cache.read_text())["content_hash"] == ss.content_hash(p)
    again = ss.file_moments(p, 3.0, **quiet)
    assert calls == [3.0] and again.to_json() == first.to_json()
    ss.file_moments(p, 4.0, **quiet)  # another cutoff: one more pass, both kept
    assert calls == [3.0, 4.0] and set(json.loads(cache.read_text())["moments"]) == {"3", "4"}
    write_hdf5(_frames(10, seed=1), p)  # new content under the same name: recomputed
    changed = ss.file_moments(p, 3.0, **quiet)
    assert calls == [3.0, 4.0, 3.0] and changed.force_sq != first.force_sq
    cache.write_text("{not json")  # a damaged cache is recomputed, never trusted
    ss.file_moments(p, 3.0, **quiet)
    assert len(calls) == 4


@pytest.mark.parametrize("fmt", ["h5", "lmdb"])
def test_lazy_dataset_uses_stored_edges_only_when_cutoff_fits(tmp_path, monkeypatch, fmt):
    p = tmp_path / f"d.{fmt}"
    write_dataset(_frames(6, isolated=False), p, cutoff=4.0)
    import mlpot.data.neighbors as nb

    ds = LazyDataset(p, cutoff=3.0)
    fr = ds.frame(0)
    assert ds.stored_edges(fr) is not None
    assert LazyDataset(p, cutoff=4.5).stored_edges(fr) is None
    calls = []
    real = nb.neighbor_list
    monkeypatch.setattr(nb, "neighbor_list", lambda *a, **k: calls.append(1) or real(*a, **k))
    ds.frame_edges(fr)
    assert calls == []  # stored list used
    LazyDataset(p, cutoff=4.5).frame_edges(fr)
    assert calls == [1]


def test_convert_writes_ordered_shards_in_parallel(tmp_path, capsys):
    frames = _frames(23, isolated=False)
    src = tmp_path / "in.xyz"
    write(src, frames)
    out = tmp_path / "big.h5"
    assert main(["data", "convert", str(src), str(out), "--shard-size", "5", "--workers", "2",
                 "--cutoff", "4.0", "--no-progress"]) == 0
    text = capsys.readouterr().out
    shards = yaml.safe_load(text.split("in a training config:\n", 1)[1])["data"]["train"]
    assert [s.rsplit("/", 1)[-1] for s in shards] == [f"big-{k:05d}.h5" for k in range(5)]
    back = [a for s in shards for a in iter_hdf5_atoms(s)]
    assert len(back) == 23
    for a, b in zip(frames, back):
        np.testing.assert_allclose(a.positions, b.positions)
        assert a.get_potential_energy() == pytest.approx(b.get_potential_energy())
    assert main(["data", "convert", str(src), str(out), "--shard-size", "0"]) == 1
    assert "--shard-size must be >= 1" in capsys.readouterr().err


def _lazy_cfg(tmp_path, name, train, valid, **training):
    cfg = toy_config(tmp_path / name, **training)
    cfg["data"] = {"train": train, "valid": valid}
    return write_config(tmp_path / f"{name}.yaml", cfg)


@pytest.mark.parametrize("fmt", ["h5", "lmdb"])
def test_train_on_shards_matches_in_memory(tmp_path, fmt):
    """Two shards (one with stored neighbour lists, one without: computed in the workers), two
    DataLoader workers; validation from an extxyz file (h5) or lazily from a dataset file (lmdb)."""
    frames, valid = _frames(30), _frames(6, seed=9, isolated=False)
    write(tmp_path / "train.xyz", frames)
    write(tmp_path / "valid.xyz", valid)
    write_dataset(frames[:12], tmp_path / f"t0.{fmt}", cutoff=5.0)
    write_dataset(frames[12:], tmp_path / f"t1.{fmt}")
    write_dataset(valid, tmp_path / "v.lmdb")
    mem = _lazy_cfg(tmp_path, "mem", str(tmp_path / "train.xyz"), str(tmp_path / "valid.xyz"), epochs=2)
    lazy = _lazy_cfg(tmp_path, "lazy", [str(tmp_path / f"t0.{fmt}"), str(tmp_path / f"t1.{fmt}")],
                     str(tmp_path / ("valid.xyz" if fmt == "h5" else "v.lmdb")), epochs=2, num_workers=2)
    assert main(["train", str(mem)]) == 0
    assert main(["train", str(lazy)]) == 0
    cfg_m = yaml.safe_load((tmp_path / "mem" / "config.yaml").read_text())["model"]
    cfg_l = yaml.safe_load((tmp_path / "lazy" / "config.yaml").read_text())["model"]
    for key in ("avg_num_neighbors", "scale", "shift"):
        assert cfg_l[key] == pytest.approx(cfg_m[key], rel=1e-9)
    assert cfg_l["e0s"] == {k: pytest.approx(v, rel=1e-9) for k, v in cfg_m["e0s"].items()}
    assert cfg_l["atomic_numbers"] == cfg_m["atomic_numbers"]
    met_m = json.loads((tmp_path / "mem" / "metrics.json").read_text())
    met_l = json.loads((tmp_path / "lazy" / "metrics.json").read_text())
    for split in ("train", "valid"):
        for key in ("e_mae", "f_mae"):
            assert met_l[split][key] == pytest.approx(met_m[split][key], rel=1e-6), (split, key)
    assert (tmp_path / (f"t0.{fmt}" + ss.CACHE_SUFFIX)).exists()  # statistics cached beside each shard


def test_lazy_valid_fraction_and_bad_mix(tmp_path, capsys):
    write_hdf5(_frames(20), tmp_path / "t.h5")
    write(tmp_path / "x.xyz", _frames(3, isolated=False))
    cfg = _lazy_cfg(tmp_path, "frac", str(tmp_path / "t.h5"), 0.25, epochs=1)
    assert main(["train", str(cfg)]) == 0
    assert "5 valid" in capsys.readouterr().out  # 25 % of the 20 non-isolated frames
    bad = _lazy_cfg(tmp_path, "mix", [str(tmp_path / "t.h5"), str(tmp_path / "x.xyz")], 0.2)
    assert main(["train", str(bad)]) == 1
    assert "mixes dataset files (.lmdb, .h5) with other formats" in capsys.readouterr().err


# Runs `mlpot train CONFIG` for each config in turn in one process and prints, per run, the peak
# anonymous resident memory (RssAnon of /proc/self/status, sampled every 2 ms from the run's
# start) and the process's peak RSS so far (ru_maxrss). Anonymous memory is what eager loading
# costs; file pages a memory-mapped LMDB file brings in are page cache the kernel can drop, and
# ru_maxrss counts them too.
RSS_DRIVER = SUBPROCESS_PROLOGUE.replace("from mlpot.cli.main import main; sys.exit(main(sys.argv[1:]))", (
    "import resource, threading, time\n"
    "def anon():\n"
    "    with open('/proc/self/status') as fh:\n"
    "        return next(int(line.split()[1]) for line in fh if line.startswith('RssAnon:'))\n"
    "peak = [anon()]\n"
    "def watch():\n"
    "    while True:\n"
    "        peak[0] = max(peak[0], anon()); time.sleep(0.002)\n"
    "threading.Thread(target=watch, daemon=True).start()\n"
    "from mlpot.cli.main import main\n"
    "for cfg in sys.argv[1:]:\n"
    "    peak[0] = anon(); code = main(['train', cfg]); peak[0] = max(peak[0], anon())\n"
    "    if code: sys.exit(code)\n"
    "    print('PEAK_KB', peak[0], resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, flush=True)\n"))


def _rattled_cells(n_frames, repeat, seed):
    """``n_frames`` rattled periodic fcc Cu cells (the cubic cell repeated ``repeat`` times)."""
    from ase.build import bulk

    base = bulk("Cu", "fcc", a=3.6, cubic=True).repeat(repeat)
    nat = len(base)
    rng = np.random.default_rng(seed)
    for _ in range(n_frames):
        a = base.copy()
        a.positions += rng.normal(0, 0.05, size=a.positions.shape)
        a.calc = SinglePointCalculator(a, energy=-3.0 * nat + 0.05 * rng.normal(),
                                       forces=rng.normal(0, 0.2, size=(nat, 3)))
        yield a


def _peak_memory_kb(tmp_path, sizes, repeat, batch_size, epochs, fmt="lmdb"):
    """``[(peak RssAnon kB, ru_maxrss kB), ...]`` of `mlpot train` (TrainToy, r_max 4 Å) on a
    dataset file of ``n`` rattled Cu cells for each ``n`` in ``sizes``, run one after the other
    in one fresh subprocess (smallest first: what a run leaves behind can only raise the next
    run's peak, never hide it)."""
    cfgs = []
    for n in sizes:
        path = tmp_path / f"d{n}.{fmt}"
        write_dataset(_rattled_cells(n, repeat, seed=n), path, cutoff=4.0)
        cfgs.append(str(_lazy_cfg(tmp_path, f"r{n}", str(path), 0.01, epochs=epochs, batch_size=batch_size,
                                  ema=False)))
    p = subprocess.run([sys.executable, "-c", RSS_DRIVER, *cfgs], capture_output=True, text=True,
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=1800)
    assert p.returncode == 0, p.stderr[-2000:]
    rows = [line.split()[1:] for line in p.stdout.splitlines() if line.startswith("PEAK_KB")]
    assert len(rows) == len(sizes), p.stdout[-2000:]
    return [(int(a), int(m)) for a, m in rows]


def test_peak_memory_does_not_grow_with_the_file(tmp_path):
    """20x the frames (800 cells of 108 atoms against 40), the same peak anonymous memory
    (+-20 %). Loading the big file eagerly costs about 0.15 MB a cell (graphs with their edges),
    some +40 % here: with the lazy path switched off (``prepare_lazy_data`` returning None) this
    test fails (peak 1.4-1.8x of the small run's)."""
    (small, _), (big, _) = _peak_memory_kb(tmp_path, (40, 800), repeat=3, batch_size=8, epochs=1)
    print(f"peak RssAnon: {small} kB (40 frames), {big} kB (800 frames), ratio {big / small:.3f}")
    assert big <= 1.2 * small, f"peak anonymous memory {big} kB for 800 frames vs {small} kB for 40"


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["lmdb", "h5"])
def test_peak_memory_20000_frames_within_20_percent_of_2000(tmp_path, fmt):
    (small_anon, small_rss), (big_anon, big_rss) = _peak_memory_kb(
        tmp_path, (2_000, 20_000), repeat=1, batch_size=250, epochs=2, fmt=fmt)
    assert big_anon <= 1.2 * small_anon, f"peak RssAnon {big_anon} kB for 20,000 frames vs {small_anon} kB for 2,000"
    assert big_rss <= 1.2 * small_rss, f"peak RSS {big_rss} kB for 20,000 frames vs {small_rss} kB for 2,000"


def test_lazy_reader_round_trip_via_read(tmp_path):
    frames = _frames(5, isolated=False)
    write_hdf5(frames, tmp_path / "d.h5")
    back = read(tmp_path / "d.h5")
    assert len(back) == 5 and np.allclose(back[2].get_forces(), frames[2].get_forces())
