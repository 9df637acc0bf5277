"""Data sources and their errors: a clear message naming the file, never a deep traceback."""

import numpy as np
import pytest

from dpgen.config import DataSource
from dpgen.data import DataError, load_dataset, load_folder, load_npz
from dpgen.data.medmnist import resolve_medmnist
from tests.conftest import data_dir


def test_medmnist_2d_and_3d_real_files():
    b = load_dataset(DataSource(source="breastmnist"))
    assert b.images.shape == (546, 1, 28, 28) and b.images.dtype == np.uint8
    assert set(np.unique(b.labels)) == {0, 1}
    v = load_dataset(DataSource(source="adrenalmnist3d", split="test"))
    assert v.images.shape == (298, 1, 28, 28, 28) and v.spatial_dims == 3
    t = load_dataset(DataSource(source="breastmnist", split="test"))
    assert len(t) == 156 and t.fingerprint == b.fingerprint  # one file, one fingerprint


def test_rgb_npz_is_channel_first(tmp_path):
    rng = np.random.default_rng(0)
    p = tmp_path / "rgb.npz"
    np.savez(p, train_images=rng.integers(0, 255, (5, 28, 28, 3), dtype=np.uint8), train_labels=np.arange(5)[:, None])
    ds = load_npz(p)
    assert ds.images.shape == (5, 3, 28, 28)


def test_missing_medmnist_offline_says_where_to_put_it(monkeypatch, tmp_path):
    monkeypatch.setenv("DPGEN_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("DPGEN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("DPGEN_OFFLINE", "1")
    with pytest.raises(DataError, match=r"retinamnist.npz not found; put it in \$DPGEN_DATA_DIR or .*cache.*md5 bd4c0672"):
        resolve_medmnist("retinamnist")


def test_unknown_dataset_name(monkeypatch, tmp_path):
    monkeypatch.setenv("DPGEN_DATA_DIR", str(tmp_path))
    with pytest.raises(DataError, match="neither a file nor a known MedMNIST name"):
        load_dataset(DataSource(source="nosuchmnist"))


def test_truncated_npz(tmp_path):
    src = (data_dir() / "breastmnist.npz").read_bytes()
    p = tmp_path / "trunc.npz"
    p.write_bytes(src[: len(src) // 2])
    with pytest.raises(DataError, match=r"trunc.npz: not a readable .npz file"):
        load_npz(p)


def test_garbage_file(tmp_path):
    p = tmp_path / "junk.npz"
    p.write_bytes(b"not a zip at all" * 10)
    with pytest.raises(DataError, match="junk.npz"):
        load_npz(p)


def test_wrong_keys(tmp_path):
    p = tmp_path / "keys.npz"
    np.savez(p, x=np.zeros((3, 28, 28), np.uint8), y=np.zeros(3))
    with pytest.raises(DataError, match=r"keys.npz: missing key\(s\) \['train_images', 'train_labels'\]"):
        load_npz(p)


def test_label_image_count_mismatch(tmp_path):
    p = tmp_path / "count.npz"
    np.savez(p, train_images=np.zeros((4, 28, 28), np.uint8), train_labels=np.zeros((3, 1)))
    with pytest.raises(DataError, match="count.npz .*3 labels for 4 images"):
        load_npz(p)


def test_nan_images(tmp_path):
    x = np.random.default_rng(0).random((4, 28, 28)).astype(np.float32)
    x[2, 3, 3] = np.nan
    p = tmp_path / "nan.npz"
    np.savez(p, train_images=x, train_labels=np.zeros((4, 1)))
    with pytest.raises(DataError, match=r"nan.npz .*1 image\(s\) contain NaN or inf"):
        load_npz(p)


def test_missing_split(tmp_path):
    p = tmp_path / "nosplit.npz"
    np.savez(p, train_images=np.zeros((4, 28, 28), np.uint8), train_labels=np.zeros((4, 1)))
    with pytest.raises(DataError, match=r"missing key\(s\) \['test_images', 'test_labels'\]"):
        load_npz(p, split="test")


def _png(path, size, value=0):
    from PIL import Image

    Image.fromarray(np.full(size, value, np.uint8)).save(path)


def test_folder_csv_with_subjects_and_attributes(tmp_path):
    rows = ["image,label,patient,age"]
    for i in range(6):
        _png(tmp_path / f"im{i}.png", (28, 28), value=i * 10)
        rows.append(f"im{i}.png,{i % 2},p{i // 2},{40 + i}")
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    ds = load_folder(tmp_path, subject_column="patient", attribute_columns=["age"])
    assert ds.images.shape == (6, 1, 28, 28)
    assert list(ds.subjects) == ["p0", "p0", "p1", "p1", "p2", "p2"]
    assert ds.attributes[:, 0].tolist() == [40, 41, 42, 43, 44, 45]


def test_folder_mixed_sizes_names_both_files(tmp_path):
    _png(tmp_path / "a.png", (28, 28))
    _png(tmp_path / "b.png", (32, 32))
    (tmp_path / "labels.csv").write_text("image,label\na.png,0\nb.png,1\n")
    with pytest.raises(DataError, match=r"b.png: image of shape \(1, 32, 32\), but .*a.png has \(1, 28, 28\)"):
        load_folder(tmp_path)


def test_folder_corrupt_image(tmp_path):
    _png(tmp_path / "a.png", (28, 28))
    (tmp_path / "b.png").write_bytes(b"\x89PNG broken")
    (tmp_path / "labels.csv").write_text("image,label\na.png,0\nb.png,1\n")
    with pytest.raises(DataError, match=r"b.png: cannot be read as an image"):
        load_folder(tmp_path)


def test_folder_missing_column(tmp_path):
    _png(tmp_path / "a.png", (28, 28))
    (tmp_path / "labels.csv").write_text("file,label\na.png,0\n")
    with pytest.raises(DataError, match=r"labels.csv: missing column\(s\) \['image'\]"):
        load_folder(tmp_path)


def test_nifti_volumes_through_monai(tmp_path):
    import nibabel as nib

    rng = np.random.default_rng(0)
    rows = ["image,label,subject"]
    for i in range(3):
        vol = rng.random((12, 12, 12)).astype(np.float32)
        nib.save(nib.Nifti1Image(vol, np.eye(4)), tmp_path / f"v{i}.nii.gz")
        rows.append(f"v{i}.nii.gz,{i % 2},s{i}")
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    ds = load_folder(tmp_path, subject_column="subject")
    assert ds.images.shape == (3, 1, 12, 12, 12) and ds.spatial_dims == 3


def test_nifti_with_nan_is_refused(tmp_path):
    import nibabel as nib

    vol = np.zeros((8, 8, 8), np.float32)
    vol[1, 1, 1] = np.inf
    nib.save(nib.Nifti1Image(vol, np.eye(4)), tmp_path / "v.nii.gz")
    (tmp_path / "labels.csv").write_text("image,label\nv.nii.gz,0\n")
    with pytest.raises(DataError, match="NaN or inf"):
        load_folder(tmp_path)


def _write_dicom(path, arr):
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientID = "OT", "anon"
    ds.Rows, ds.Columns = arr.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = arr.astype(np.uint16).tobytes()
    ds.save_as(str(path), enforce_file_format=True)


def test_dicom_through_monai_and_intensity_scaling(tmp_path):
    rows = ["image,label"]
    for i in range(2):
        _write_dicom(tmp_path / f"s{i}.dcm", (np.arange(32 * 32).reshape(32, 32) % 1000) * (i + 1))
        rows.append(f"s{i}.dcm,{i}")
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    ds = load_folder(tmp_path)
    assert ds.images.shape == (2, 1, 32, 32) and ds.images.max() == 1998
    x = ds.model_tensor()  # per-image min-max: each image spans [-1, 1] on its own
    assert x.min() == -1 and x.max() == 1
    ds.intensity_range = (0.0, 1998.0)  # a fixed (public) window keeps relative intensities
    x = ds.model_tensor()
    assert x[0].max() <= 0 and x[1].max() == 1
