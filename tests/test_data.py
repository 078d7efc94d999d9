"""data.py: pair folders pooled, split by scan, augmentation symmetric for LR and HR,
deterministic resumable batches, clear errors for bad folders."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import tifffile
import torch

from _train_data import make_16_bit_copy, make_pair_folder
from microct_sr.data import (GRAY_GAIN, GRAY_OFFSET, IterationBatchSampler, PatchDataset,
                             augment_pair, draw_gray, estimate_window, gray_transform, load_split,
                             lr_pixel_range, make_split, patch_dtype, read_pairs, save_split)
from microct_sr.errors import UserError


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("pairs")
    a = make_pair_folder(root / "a", ["rat1", "rat2", "rat3"], patches_per_scan=3, seed=1)
    b = make_pair_folder(root / "b", ["rat4", "rat5"], patches_per_scan=3, seed=2)
    return a, b


def test_pools_folders_and_scales_to_window(folders):
    ds = PatchDataset(folders, None, augment=False, window=(0.0, 255.0))
    assert len(ds) == 15
    lr, hr = ds[0]
    assert lr.shape == (1, 8, 8) and hr.shape == (1, 64, 64) and lr.dtype == torch.float32
    raw_lr, raw_hr = ds.read_raw(0)
    assert torch.allclose(hr[0], torch.from_numpy(raw_hr / 255.0).float())
    assert 0.0 <= float(hr.min()) and float(hr.max()) <= 1.0
    assert estimate_window(ds) == (0.0, 255.0)  # uint8 -> full range


def test_subset_by_scan(folders):
    ds = PatchDataset(folders, ["rat2", "rat5"])
    assert len(ds) == 6 and {p.scan_id for p in ds.pairs} == {"rat2", "rat5"}


def test_split_is_by_scan_and_saved(folders, tmp_path):
    scans = [p.scan_id for p in read_pairs(folders)]
    split = make_split(scans, seed=0)
    assert sorted(sum(split.values(), [])) == ["rat1", "rat2", "rat3", "rat4", "rat5"]
    assert len(split["val"]) == 1 and len(split["test"]) == 1 and len(split["train"]) == 3
    assert make_split(scans, seed=0) == split  # same seed, same split
    save_split(split, tmp_path / "split.json")
    assert load_split(tmp_path / "split.json", scans) == split


def test_bad_split_file(tmp_path):
    f = tmp_path / "s.json"
    f.write_text('{"train": ["a"], "val": ["a"]}')
    with pytest.raises(UserError, match="both"):
        load_split(f)
    f.write_text("not json")
    with pytest.raises(UserError, match="s.json"):
        load_split(f)


def test_scans_left_out_of_a_split_file_are_named_in_a_warning(tmp_path, caplog):
    f = tmp_path / "s.json"
    f.write_text('{"train": ["a"], "val": ["b"]}')
    with caplog.at_level("WARNING"):
        assert load_split(f, ["a", "b"])["train"] == ["a"]
    assert "unused" not in caplog.text
    with caplog.at_level("WARNING"):
        load_split(f, ["a", "b", "c", "d"])
    assert "s.json: 2 scan(s) in the data are in no split list and go unused: c, d" in caplog.text


def test_augmentation_keeps_lr_hr_correspondence(folders):
    ds = PatchDataset(folders, None)
    lr, hr = (a.astype(np.float64) for a in ds.read_raw(0))
    for code in range(8):
        a_lr, a_hr = augment_pair(lr, hr, code)
        # the 8x8 block means of the HR still line up with the LR pixel by pixel
        blocks = a_hr.reshape(8, 8, 8, 8).mean(axis=(1, 3))
        orig = hr.reshape(8, 8, 8, 8).mean(axis=(1, 3))
        assert np.allclose(blocks, augment_pair(orig, hr, code)[0])
        assert np.allclose(a_lr, augment_pair(lr, orig, code)[0])
    outs = {augment_pair(lr, hr, c)[1].tobytes() for c in range(8)}
    assert len(outs) == 8  # eight distinct symmetries


def test_sampler_depends_only_on_iteration():
    full = list(IterationBatchSampler(10, 4, seed=3, start=0, stop=6))
    resumed = list(IterationBatchSampler(10, 4, seed=3, start=4, stop=6))
    assert resumed == full[4:]
    seen = [i for b in full[:5] for i, *_ in b][:10]
    assert sorted(seen) == list(range(10))  # one epoch visits every patch once
    r0 = list(IterationBatchSampler(10, 4, seed=3, start=0, stop=6, rank=0, world=2))
    r1 = list(IterationBatchSampler(10, 4, seed=3, start=0, stop=6, rank=1, world=2))
    assert [a + b for a, b in zip(r0, r1)] == full  # ranks share each global batch
    with pytest.raises(UserError, match="divisible"):
        IterationBatchSampler(10, 3, seed=0, start=0, stop=1, world=2)


def test_sampler_symmetries_are_the_seeded_draws():
    """Each epoch's order and symmetries are the first two draws of rng([seed, epoch]) (the
    shipped models' batches); the gray seeds are drawn after them."""
    batches = list(IterationBatchSampler(6, 3, seed=5, start=0, stop=4))
    for epoch in (0, 1):
        rng = np.random.default_rng([5, epoch])
        perm, codes, grays = rng.permutation(6), rng.integers(0, 8, 6), rng.integers(0, 2**31, 6)
        got = [k for b in batches[2 * epoch:2 * epoch + 2] for k in b]
        assert got == [(int(perm[j]), int(codes[j]), int(grays[j])) for j in range(6)]


def test_gray_transform_known_values():
    x = torch.tensor([0.0, 0.25, 0.5, 1.0])
    lr, hr = gray_transform(x.clone(), x.clone(), 2.0, -0.5)
    assert lr.tolist() == [0.0, 0.0, 0.5, 1.0] and torch.equal(lr, hr)  # clipped at both ends
    lr, _ = gray_transform(x.clone(), x.clone(), 0.8, 0.1)
    assert lr.tolist() == pytest.approx([0.1, 0.3, 0.5, 0.9])


def test_draw_gray_ranges_probability_and_seed():
    draws = [draw_gray(s, 0.5) for s in range(400)]
    kept = [d for d in draws if d is not None]
    assert 150 < len(kept) < 250
    assert all(GRAY_GAIN[0] <= g <= GRAY_GAIN[1] and GRAY_OFFSET[0] <= b <= GRAY_OFFSET[1]
               for g, b in kept)
    assert min(b for _, b in kept) < -0.15 and max(g for g, _ in kept) > 1.15  # spans the range
    assert draw_gray(7, 0.5) == draw_gray(7, 0.5)
    assert all(draw_gray(s, 0.0) is None for s in range(50))
    assert all(draw_gray(s, 1.0) is not None for s in range(50))


def test_gray_augment_maps_lr_and_hr_alike(folders):
    plain = PatchDataset(folders, None, augment=True, window=(0.0, 255.0))
    gray = PatchDataset(folders, None, augment=True, window=(0.0, 255.0), gray_augment=1.0)
    seed = next(s for s in range(100) if draw_gray(s, 1.0)[1] < -0.1)  # some clipping at 0
    gain, offset = draw_gray(seed, 1.0)
    lr0, hr0 = plain[(4, 3, seed)]  # gray seeds are ignored with gray_augment 0
    assert all(torch.equal(a, b) for a, b in zip((lr0, hr0), plain[(4, 3)]))
    lr, hr = gray[(4, 3, seed)]
    assert torch.allclose(lr, (gain * lr0 + offset).clamp(0, 1))
    assert torch.allclose(hr, (gain * hr0 + offset).clamp(0, 1))
    assert not torch.equal(hr, hr0) and float(hr.min()) >= 0.0
    off = PatchDataset(folders, None, augment=False, window=(0.0, 255.0), gray_augment=1.0)
    assert torch.equal(off[(4, 0, seed)][1], plain[(4, 0)][1])  # only when augmenting


def test_folder_of_pair_folders(folders):
    parent = folders[0].parent  # holds the pair folders a/ and b/
    assert read_pairs([parent]) == read_pairs(list(folders))


def test_empty_and_missing_folders(tmp_path):
    with pytest.raises(UserError, match="pairs.csv"):
        read_pairs([tmp_path])
    (tmp_path / "pairs.csv").write_text("patch_id,scan_id\n")
    with pytest.raises(UserError, match="no patches"):
        read_pairs([tmp_path])
    with pytest.raises(UserError, match="not found"):
        read_pairs([tmp_path / "nope"])


def test_window_of_16_bit_data_is_its_range(tmp_path, folders):
    out = make_16_bit_copy(folders[0], tmp_path / "p16")
    ds = PatchDataset([out], None)
    values = [f(a) for i in range(len(ds)) for a in ds.read_raw(i) for f in (np.min, np.max)]
    assert estimate_window(ds) == (float(min(values)), float(max(values)))
    assert patch_dtype(ds.pairs) == "uint16" and patch_dtype(read_pairs(folders)) == "uint8"


def test_mixed_patch_dtypes_are_refused_naming_both_files(tmp_path, folders):
    """8- and 16-bit patches pooled would need two windows: one patch per folder is read."""
    out = make_16_bit_copy(folders[1], tmp_path / "p16")
    for dirs in ([folders[0], out], [out, folders[0]]):
        with pytest.raises(UserError, match="mixed patch dtypes") as e:
            patch_dtype(read_pairs(dirs))
        assert str(folders[0] / "lr") in str(e.value) and str(out / "lr") in str(e.value)
        assert "uint8" in str(e.value) and "uint16" in str(e.value)
        with pytest.raises(UserError, match="mixed patch dtypes"):
            estimate_window(PatchDataset(dirs, None))
    lr16 = next((folders[0] / "lr").glob("*.tif"))  # LR and HR of one pair disagree
    mixed = tmp_path / "mixed"
    shutil.copytree(folders[0], mixed)
    tifffile.imwrite(mixed / "lr" / lr16.name, tifffile.imread(lr16).astype(np.uint16))
    with pytest.raises(UserError, match=f"{mixed / 'lr' / lr16.name} is uint16"):
        estimate_window(PatchDataset([mixed], None))


def test_mixed_dtypes_in_one_pair_folder_are_refused_before_any_work(tmp_path, folders):
    """`pair` adds an 8-bit scan to a folder of 16-bit ones without complaint; the check reads
    every scan's first patch, so a val scan of the other dtype (which the window estimate on the
    train scans never reads) is refused, not scaled by the wrong window."""
    mixed = make_16_bit_copy(folders[0], tmp_path / "mixed")  # rat1..rat3, uint16
    for sub in ("lr", "hr"):  # rat3 back to uint8, as if paired from an 8-bit export
        for p in (folders[0] / sub).glob("rat3_*.tif"):
            shutil.copy(p, mixed / sub / p.name)
    with pytest.raises(UserError, match="mixed patch dtypes") as e:
        patch_dtype(read_pairs([mixed]))
    assert "rat3_00000.tif is uint8" in str(e.value)


def test_hr_patches_of_another_dtype_than_the_lr_ones_are_refused(tmp_path, folders):
    """LR patches keep the LR scan's dtype and HR ones the HR scan's: one scan whose HR
    patches alone are 16-bit (its LR ones 8-bit like every other scan's) is refused too,
    naming its HR patch; patch_dtype reads the HR patch of each scan, not only the LR one."""
    mixed = tmp_path / "mixed"
    shutil.copytree(folders[0], mixed)
    for p in (mixed / "hr").glob("rat3_*.tif"):
        tifffile.imwrite(p, tifffile.imread(p).astype(np.uint16) * 257)
    with pytest.raises(UserError, match="mixed patch dtypes") as e:
        patch_dtype(read_pairs([mixed]))
    assert f"{mixed / 'hr' / 'rat3_00000.tif'} is uint16" in str(e.value)
    assert patch_dtype(read_pairs([folders[0]])) == "uint8"


def test_a_folder_given_twice_counts_once(folders, caplog):
    """The same folder twice, or with the parent that holds it, is pooled once."""
    a, b = folders
    assert read_pairs([a, a]) == read_pairs([a])
    assert read_pairs([a, a.parent]) == read_pairs([a, b])
    assert len(read_pairs([a.parent / ".." / a.parent.name / "a", a])) == len(read_pairs([a]))
    assert "given more than once" in caplog.text


def test_lr_pixel_range_of_the_training_scans(tmp_path):
    """From each pair folder's registration.json (HR pixel x factor), training scans only;
    None when no folder says (a hand-made folder, an unreadable file)."""
    import json

    a = make_pair_folder(tmp_path / "a", ["rat1", "rat2"], 2, lr_patch=4, seed=1)
    b = make_pair_folder(tmp_path / "b", ["rat3"], 2, lr_patch=4, seed=2)
    pairs = read_pairs([a, b])
    assert lr_pixel_range(pairs, ["rat1", "rat3"]) is None
    (a / "registration.json").write_text(json.dumps([
        {"scan_id": "rat1", "hr_pixel_um": 10.0, "factor": 8},
        {"scan_id": "rat2", "hr_pixel_um": 5.0, "factor": 8},  # not a training scan below
        {"scan_id": "ratX", "hr_pixel_um": None, "factor": 8}]))
    (b / "registration.json").write_text(json.dumps([
        {"scan_id": "rat3", "hr_pixel_um": 12.5, "factor": 8}]))
    assert lr_pixel_range(pairs, ["rat1", "rat3"]) == [80.0, 100.0]
    assert lr_pixel_range(pairs, ["rat1", "rat2", "rat3"]) == [40.0, 100.0]
    (b / "registration.json").write_text("{not json")
    assert lr_pixel_range(pairs, ["rat3"]) is None
