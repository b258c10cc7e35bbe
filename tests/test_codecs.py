"""Tests of the mask codecs (docs/method.md#mask-embedding).

Masks are generated here (seeded): rotated filled ellipses, rings and
triangles that roughly fill the 28x28 frame, like GT masks cropped to their
boxes. Codecs are fitted on 500 masks and scored on 200 held-out masks.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from istr.codecs import CODECS, AECodec, DCTCodec, PCACodec, SparseCodec, build_codec, load_codec, mask_iou
from istr.codecs.base import MASK_EPS, MaskCodec, masks_to_logits
from istr.codecs.dct import zigzag_indices

pytestmark = pytest.mark.usefixtures("one_thread")

DIM = 60
SIZE = 28
Fitted = tuple[str, MaskCodec, dict[str, float]]

# name -> (constructor params, held-out IoU floor). Measured held-out IoU at
# dim 60 with these 500 fitting masks: pca 0.857, dct 0.865, sparse 0.761
# (seeds 1-2: 0.773, 0.766), ae with 2 epochs of batch 4 0.673 (seeds 1-3:
# 0.711, 0.704, 0.696); floors sit a little below.
CASES: dict[str, tuple[dict[str, int | float], float]] = {
    "pca": ({}, 0.83),
    "dct": ({}, 0.84),
    "sparse": ({}, 0.73),
    "ae": ({"epochs": 2, "batch_size": 4}, 0.63),
}


def ellipse_polygon(
    cx: float, cy: float, rx: float, ry: float, rotation: float, scale: float = 1.0
) -> list[tuple[float, float]]:
    """64-gon of an ellipse centred at (cx, cy), radii scaled by ``scale``, rotated by ``rotation``."""
    t = np.linspace(0.0, 2.0 * math.pi, 64, endpoint=False)
    x, y = scale * rx * np.cos(t), scale * ry * np.sin(t)
    px = cx + x * math.cos(rotation) - y * math.sin(rotation)
    py = cy + x * math.sin(rotation) + y * math.cos(rotation)
    return list(zip(px.tolist(), py.tolist(), strict=True))


def make_masks(n: int, seed: int, supersample: int = 4) -> torch.Tensor:
    """``n`` binary 28x28 masks cycling ellipse / ring / triangle, drawn at 4x and box-downsampled."""
    rng = np.random.default_rng(seed)
    big = SIZE * supersample
    out = np.zeros((n, SIZE, SIZE), np.float32)
    for i in range(n):
        img = Image.new("L", (big, big), 0)
        draw = ImageDraw.Draw(img)
        if i % 3 == 2:
            vertices = rng.uniform(-0.05, 1.05, (3, 2)) * big
            draw.polygon([tuple(v) for v in vertices], fill=255)
        else:
            cx, cy = rng.uniform(0.35, 0.65, 2) * big
            rx, ry = rng.uniform(0.3, 0.55, 2) * big
            rotation = rng.uniform(0.0, math.pi)
            draw.polygon(ellipse_polygon(cx, cy, rx, ry, rotation), fill=255)
            if i % 3 == 1:
                hole = ellipse_polygon(cx, cy, rx, ry, rotation, scale=rng.uniform(0.4, 0.7))
                draw.polygon(hole, fill=0)
        out[i] = np.asarray(img.resize((SIZE, SIZE), Image.BOX), np.float32) > 127.5
    return torch.from_numpy(out)


@pytest.fixture(scope="module")
def train_masks() -> torch.Tensor:
    return make_masks(500, seed=0)


@pytest.fixture(scope="module")
def test_masks() -> torch.Tensor:
    return make_masks(200, seed=1)


@pytest.fixture(scope="module", params=list(CASES))
def fitted(request: pytest.FixtureRequest, train_masks: torch.Tensor) -> Fitted:
    name = request.param
    codec = build_codec(name, DIM, **CASES[name][0])
    stats = codec.fit(train_masks)
    return name, codec, stats


def test_unknown_type_lists_valid_names() -> None:
    with pytest.raises(ValueError) as err:
        build_codec("wavelet", DIM)
    assert all(name in str(err.value) for name in CODECS)
    codec = build_codec("sparse", 20, num_atoms=32, sparsity=0.5)
    assert isinstance(codec, SparseCodec) and codec.dim == 20 and codec.num_atoms == 32


def test_mask_iou_helper() -> None:
    pred = torch.zeros(3, 4, 4, dtype=torch.bool)
    target = torch.zeros(3, 4, 4, dtype=torch.bool)
    pred[1, :2] = True  # 8 pixels
    target[1, :1] = True  # 4 pixels, inside pred
    target[2, 0, 0] = True  # pred empty, target not
    assert mask_iou(pred, target).tolist() == [1.0, 0.5, 0.0]


def test_fit_stats_and_frozen(fitted: Fitted, train_masks: torch.Tensor) -> None:
    _, codec, stats = fitted
    assert codec.fitted
    assert 0.0 < stats["mask_iou"] <= 1.0 and stats["n_masks"] == len(train_masks)
    assert stats["mask_iou"] == pytest.approx(codec.reconstruction_iou(train_masks), abs=1e-6)
    assert not any(p.requires_grad for p in codec.parameters())


def test_shapes_dtype_and_empty(fitted: Fitted, test_masks: torch.Tensor) -> None:
    _, codec, _ = fitted
    codes = codec.encode(test_masks[:7])
    assert codes.shape == (7, DIM) and codes.dtype == torch.float32
    logits = codec.decode(codes)
    assert logits.shape == (7, SIZE, SIZE) and logits.dtype == torch.float32
    assert codec.encode(torch.zeros(0, SIZE, SIZE)).shape == (0, DIM)
    assert codec.decode(torch.zeros(0, DIM)).shape == (0, SIZE, SIZE)
    with pytest.raises(ValueError):
        codec.encode(torch.zeros(2, SIZE, SIZE + 1))
    with pytest.raises(ValueError):
        codec.decode(torch.zeros(2, DIM + 1))


def test_decode_is_differentiable(fitted: Fitted, test_masks: torch.Tensor) -> None:
    _, codec, _ = fitted
    codes = codec.encode(test_masks[:5]).requires_grad_(True)
    # Dice-like use: gradient of a function of the probabilities w.r.t. the codes.
    codec.decode(codes).sigmoid().mul(test_masks[:5]).sum().backward()
    assert codes.grad is not None and torch.isfinite(codes.grad).all() and codes.grad.abs().sum() > 0


def test_save_load_roundtrip(fitted: Fitted, test_masks: torch.Tensor, tmp_path: Path) -> None:
    _, codec, _ = fitted
    path = tmp_path / "sub" / "codec.pt"
    codec.save(path)
    codec.save(path)  # overwriting an existing file is fine
    assert [p.name for p in path.parent.iterdir()] == ["codec.pt"]  # no temp file left
    loaded = load_codec(path)
    assert type(loaded) is type(codec) and loaded.fitted and loaded.dim == DIM
    assert not any(p.requires_grad for p in loaded.parameters())
    codes = codec.encode(test_masks[:9])
    assert torch.equal(loaded.encode(test_masks[:9]), codes)
    assert torch.equal(loaded.decode(codes), codec.decode(codes))


def test_heldout_iou_floor(fitted: Fitted, test_masks: torch.Tensor) -> None:
    name, codec, _ = fitted
    assert codec.reconstruction_iou(test_masks) >= CASES[name][1]


def test_follows_moved_dtype(fitted: Fitted, test_masks: torch.Tensor, tmp_path: Path) -> None:
    _, codec, _ = fitted
    codec.save(tmp_path / "c.pt")
    wide = load_codec(tmp_path / "c.pt").double()
    codes = codec.encode(test_masks[:4])
    out = wide.decode(codes)  # float32 codes are cast to the codec's dtype
    assert out.dtype == torch.float64
    torch.testing.assert_close(out.float(), codec.decode(codes), atol=1e-3, rtol=1e-3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_follows_moved_device(fitted: Fitted, test_masks: torch.Tensor) -> None:
    _, codec, _ = fitted
    codes = codec.encode(test_masks[:4])
    expected = codec.decode(codes)
    gpu = codec.to("cuda")
    try:
        assert gpu.encode(test_masks[:4]).device.type == "cuda"
        torch.testing.assert_close(gpu.decode(codes.cuda()).cpu(), expected, atol=1e-3, rtol=1e-3)
    finally:
        codec.to("cpu")


@pytest.mark.parametrize("cls", [PCACodec, SparseCodec, AECodec])
def test_unfitted_codec_refuses(cls: type) -> None:
    with pytest.raises(RuntimeError, match="not fitted"):
        cls(dim=8).encode(torch.zeros(1, SIZE, SIZE))


def test_load_rejects_foreign_file(tmp_path: Path) -> None:
    path = tmp_path / "x.pt"
    torch.save({"weights": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match="not a mask codec"):
        load_codec(path)


def test_zigzag_order() -> None:
    # (row, col) = (vertical, horizontal frequency), JPEG convention.
    order = zigzag_indices(SIZE)
    assert order[:10] == [(0, 0), (0, 1), (1, 0), (2, 0), (1, 1), (0, 2), (0, 3), (1, 2), (2, 1), (3, 0)]
    assert sorted(order) == [(r, c) for r in range(SIZE) for c in range(SIZE)]
    assert order[-1] == (SIZE - 1, SIZE - 1)


def test_dct_full_dim_is_exact(train_masks: torch.Tensor) -> None:
    codec = DCTCodec(dim=SIZE * SIZE)
    basis = codec.basis.double()
    torch.testing.assert_close(basis @ basis.T, torch.eye(SIZE * SIZE, dtype=torch.float64), atol=1e-5, rtol=0)
    logits = codec.decode(codec.encode(train_masks[:50]))
    expected = masks_to_logits(train_masks[:50]).view(-1, SIZE, SIZE)
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=0)
    assert codec.fit(train_masks)["mask_iou"] == 1.0


def test_dct_first_coefficient_is_dc() -> None:
    # A constant mask has only the DC coefficient: 28 * logit(1 - eps).
    codes = DCTCodec(dim=6).encode(torch.ones(1, SIZE, SIZE))
    expected = SIZE * math.log((1 - MASK_EPS) / MASK_EPS)
    torch.testing.assert_close(codes[0], torch.tensor([expected, 0, 0, 0, 0, 0]), atol=1e-3, rtol=0)


def test_pca_codes_are_whitened(train_masks: torch.Tensor) -> None:
    codec = PCACodec(dim=DIM)
    codec.fit(train_masks)
    codes = codec.encode(train_masks).double()
    torch.testing.assert_close(codes.var(0), torch.ones(DIM, dtype=torch.float64), atol=1e-3, rtol=0)
    torch.testing.assert_close(codes.mean(0), torch.zeros(DIM, dtype=torch.float64), atol=1e-3, rtol=0)


def test_pca_matches_numpy_svd(train_masks: torch.Tensor) -> None:
    codec = PCACodec(dim=DIM)
    codec.fit(train_masks)
    x = train_masks.numpy().reshape(len(train_masks), -1).astype(np.float64)
    p = np.clip(x, MASK_EPS, 1 - MASK_EPS)
    x = np.log(p / (1 - p))
    mean = x.mean(0)
    _, _, vt = np.linalg.svd(x - mean, full_matrices=False)
    expected = (x - mean) @ vt[:DIM].T @ vt[:DIM] + mean
    ours = codec.decode(codec.encode(train_masks)).reshape(len(train_masks), -1).double().numpy()
    np.testing.assert_allclose(ours, expected, atol=2e-3)


def test_pca_variance_ratio_grows_and_fit_is_deterministic(train_masks: torch.Tensor) -> None:
    ratios = [PCACodec(dim=d).fit(train_masks)["explained_variance_ratio"] for d in (20, 60, 100)]
    assert ratios == sorted(ratios) and 0 < ratios[0] and ratios[-1] < 1
    a, b = PCACodec(dim=DIM), PCACodec(dim=DIM)
    a.fit(train_masks)
    b.fit(train_masks)
    assert torch.equal(a.encode(train_masks[:20]), b.encode(train_masks[:20]))


def test_sparse_dim_equal_atoms_keeps_full_code(train_masks: torch.Tensor) -> None:
    # dim == num_atoms: the projection is an invertible rotation, so the codec
    # reconstructs exactly what the full sparse code does.
    stats = SparseCodec(dim=48, num_atoms=48, iterations=3).fit(train_masks)
    assert stats["mask_iou"] == pytest.approx(stats["sparse_mask_iou"], abs=0.01)
    assert 0 < stats["active_atoms"] <= 48


def test_codes_have_unit_scale(fitted: Fitted, train_masks: torch.Tensor) -> None:
    # Every codec's codes are whitened (PCA, sparse) or standardised (DCT, AE) on its fitting masks,
    # so the L2 mask loss weighs them alike (docs/method.md#mask-embedding, "Standardised codes").
    _, codec, _ = fitted
    codes = codec.encode(train_masks).double()
    torch.testing.assert_close(codes.mean(0), torch.zeros(DIM, dtype=torch.float64), atol=1e-3, rtol=0)
    torch.testing.assert_close(codes.std(0), torch.ones(DIM, dtype=torch.float64), atol=1e-3, rtol=0)


@pytest.mark.parametrize("name", [n for n, cls in CODECS.items() if cls.standardize_codes])
def test_standardizing_keeps_the_reconstruction(name: str, train_masks: torch.Tensor) -> None:
    codec = build_codec(name, DIM, **CASES[name][0])
    codec.fit(train_masks)
    raw = codec._encode(train_masks[:50])
    assert (raw.std(0) - 1).abs().max() > 0.5  # the raw codes are far from unit scale: the change does something
    torch.testing.assert_close(codec.decode(codec.encode(train_masks[:50])), codec._decode(raw).view(-1, SIZE, SIZE),
                               atol=1e-3, rtol=0)


def test_codec_file_without_standardization_keeps_raw_codes(train_masks: torch.Tensor, tmp_path: Path) -> None:
    # A DCT codec saved before codes were standardised: the run that wrote it trained on raw codes.
    codec = DCTCodec(dim=DIM)
    codec.fit(train_masks)
    codec.save(tmp_path / "codec.pt")
    payload = torch.load(tmp_path / "codec.pt", weights_only=True)
    del payload["state"]["code_mean"], payload["state"]["code_scale"]
    torch.save(payload, tmp_path / "old.pt")
    old = load_codec(tmp_path / "old.pt")
    assert torch.equal(old.encode(train_masks[:9]), codec._encode(train_masks[:9]))
    del payload["state"]["basis"]
    torch.save(payload, tmp_path / "broken.pt")
    with pytest.raises(ValueError, match="broken.pt.*missing.*basis"):
        load_codec(tmp_path / "broken.pt")
