"""Embedded procedural data and the DeepForest tiler."""

import zipfile

import cv2
import numpy as np

from yolo_fgd.data.deepforest import TRAIN, VAL, deepforest, tile_scene
from yolo_fgd.data.shapes import NAMES, render, shapes


def test_render_is_deterministic_and_varied():
    a, la = render(3)
    b, lb = render(3)
    assert np.array_equal(a, b) and np.array_equal(la, lb)
    c, _ = render(4)
    assert not np.array_equal(a, c)
    labels = np.concatenate([render(i)[1] for i in range(200)])
    assert len(NAMES) >= 5 and set(labels[:, 0].astype(int)) == set(range(len(NAMES)))
    assert ((labels[:, 1:] >= 0) & (labels[:, 1:] <= 1)).all()
    side = np.sqrt(labels[:, 3] * labels[:, 4]) * 256
    assert (side < 16).sum() > 50 and (side > 64).sum() > 10  # small and large objects


def test_shapes_writes_yolo_layout_once(tmp_path):
    y = shapes(tmp_path, n_train=3, n_val=2, size=64)
    assert y.is_file() and "names:" in y.read_text()
    root = y.parent
    assert len(list((root / "images" / "train").glob("*.jpg"))) == 3
    assert len(list((root / "labels" / "val").glob("*.txt"))) == 2
    mtime = y.stat().st_mtime
    assert shapes(tmp_path, n_train=3, n_val=2, size=64) == y and y.stat().st_mtime == mtime
    assert shapes(tmp_path, n_train=3, n_val=2, size=64, seed=1) != y


def test_tile_scene_clips_and_drops_slivers():
    img = np.zeros((100, 150, 3), np.uint8)
    boxes = np.array([[10, 10, 30, 30], [55, 10, 75, 30], [61, 40, 70, 50]], np.float32)
    tiles = list(tile_scene(img, boxes, tile=64, overlap=0, min_visible=0.4))
    first = dict(((x, y), b) for _, b, (x, y) in tiles)[(0, 0)]
    assert [10, 10, 30, 30] in first.tolist() and [55, 10, 64, 30] in first.tolist()  # 9/20 visible: kept, clipped
    assert not any(b[0] >= 61 and b[1] >= 40 for b in first.tolist())  # 3/9 of the third box visible: dropped
    assert all(t.shape[:2] == (64, 64) for t, _, _ in tiles)


def test_deepforest_from_local_wheel(tmp_path):
    """Same code path as the real wheel, on a small wheel-shaped zip (no network in tests)."""
    wheel = tmp_path / "df" / "wheel" / "deepforest-0.0.0-py3-none-any.whl"
    wheel.parent.mkdir(parents=True)
    with zipfile.ZipFile(wheel, "w") as z:
        for stem, n in ((TRAIN, 3), (VAL, 2)):
            img = np.random.RandomState(0).randint(0, 255, (400, 500, 3), np.uint8)
            z.writestr(f"deepforest/data/{stem}.png", cv2.imencode(".png", img)[1].tobytes())
            objs = "".join(f"<object><name>Tree</name><bndbox><xmin>{20 + 100 * i}</xmin><ymin>30</ymin>"
                           f"<xmax>{60 + 100 * i}</xmax><ymax>80</ymax></bndbox></object>" for i in range(n))
            z.writestr(f"deepforest/data/{stem}.xml", f"<annotation>{objs}</annotation>")
    y = deepforest(tmp_path / "df", tile=200, overlap=0)
    root = y.parent
    assert "0: tree" in y.read_text()
    train = list((root / "labels" / "train").glob("*.txt"))
    assert len(train) == 6  # 2 x 3 tiles of 200 px over 400 x 500 (last column shifted to the edge)
    assert sum(len(f.read_text().splitlines()) for f in train) >= 3


def test_coco_ground_truth_of_every_task_has_the_detection_boxes(tmp_path):
    """COCOeval of any task's student scores its boxes: segment polygons and OBB corners give their bounding boxes,
    pose rows their leading box (the shapes' labels of every task describe the same objects)."""
    from yolo_fgd.data.coco import yolo_split_to_coco

    gts = {t: yolo_split_to_coco(shapes(tmp_path, n_train=1, n_val=6, size=128, task=t), "val")[0]
           for t in ("detect", "segment", "pose", "obb")}
    ref = np.array([a["bbox"] for a in gts["detect"]["annotations"]])
    assert len(ref) > 6
    for task, tol in (("pose", 0.01), ("segment", 1.0), ("obb", None)):
        boxes = np.array([a["bbox"] for a in gts[task]["annotations"]])
        assert boxes.shape == ref.shape, task
        if tol is not None:  # px at 128 px; an OBB's hull is larger than the outline's box
            np.testing.assert_allclose(boxes, ref, atol=tol, err_msg=task)
        else:
            assert (boxes[:, 2:] >= ref[:, 2:] - 1.0).all()
