"""immiscible_pipeline.data: sources, column checks, transforms, seeded augmentation and shuffling,
and the in-memory path for square array images (the bundled MNIST)."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

import immiscible_pipeline.data.train_images as train_images_module
from immiscible_pipeline.data import (EpochShuffle, ImageTransform, PreparedTrainImages, TrainImages,
                                                     check_column, load_image_dataset, load_mnist, mnist_arrays,
                                                     to_pil, train_dataloader, train_images_for)


def test_bundled_mnist_splits_and_exact_bytes():
    sizes = {}
    for split in ("train", "validation", "test"):
        images, labels = mnist_arrays(split)
        sizes[split] = len(images)
        assert images.dtype == np.uint8 and images.shape[1:] == (28, 28) and labels.dtype == np.int64
    assert sizes == {"train": 50_000, "validation": 10_000, "test": 10_000}
    images, labels = mnist_arrays("train")
    assert images.max() == 255 and set(np.unique(labels)) == set(range(10))
    with pytest.raises(ValueError, match="train, validation, test"):
        mnist_arrays("dev")


def test_load_mnist_is_a_labelled_dataset_matching_the_arrays():
    dataset = load_mnist("test")
    images, labels = mnist_arrays("test")
    assert dataset.column_names == ["image", "label"] and len(dataset) == 10_000
    assert dataset.features["label"].names == [str(d) for d in range(10)]
    for index in (0, 4321, 9999):
        assert np.array_equal(np.asarray(dataset[index]["image"]), images[index])
        assert dataset[index]["label"] == labels[index]


def test_imagefolder_has_images_and_class_labels(tiny_imagefolder, tmp_path):
    dataset = load_image_dataset(train_data_dir=str(tiny_imagefolder), cache_dir=str(tmp_path))
    assert len(dataset) == 12 and set(dataset.column_names) == {"image", "label"}
    assert dataset.features["label"].names == ["class_0", "class_1"]


def test_source_errors_name_what_is_wrong(tmp_path):
    with pytest.raises(ValueError, match="not both"):
        load_image_dataset(dataset_name="cifar10", train_data_dir=str(tmp_path))
    with pytest.raises(ValueError, match=r"--train_data_dir .*missing is not a directory"):
        load_image_dataset(train_data_dir=str(tmp_path / "missing"))
    (tmp_path / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match=rf"--train_data_dir {tmp_path} holds no images"):
        load_image_dataset(train_data_dir=str(tmp_path))
    Image.new("RGB", (4, 4)).save(tmp_path / "good.png")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "broken.jpg").write_bytes(b"this is not a jpeg")
    with pytest.raises(ValueError, match=r"cannot read the image .*sub/broken\.jpg"):
        load_image_dataset(train_data_dir=str(tmp_path))


def test_check_column_lists_the_columns():
    dataset = load_mnist("validation")
    check_column(dataset, "image", "--image_column")
    with pytest.raises(ValueError, match=r"--image_column 'img' is not a column of the dataset; its columns are: "
                                         r"image, label \(image columns: image\)"):
        check_column(dataset, "img", "--image_column")


def test_to_pil_reads_every_stored_form():
    grey = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    assert np.array_equal(np.asarray(to_pil(grey.tolist())), grey)  # nested lists, as Array2D rows come
    assert np.array_equal(np.asarray(to_pil(grey / 255.0)), grey)  # floats in [0, 1]
    rgb = np.random.default_rng(0).integers(0, 256, (3, 5, 6), dtype=np.uint8)
    assert np.array_equal(np.asarray(to_pil(rgb)), rgb.transpose(1, 2, 0))  # channels first
    buffer = io.BytesIO()
    Image.fromarray(grey).save(buffer, format="PNG")
    assert np.array_equal(np.asarray(to_pil({"bytes": buffer.getvalue(), "path": None})), grey)


def test_transform_shape_range_and_centre_crop():
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8))
    rgb = ImageTransform(8, channels=3, center_crop=True)(image)
    grey = ImageTransform(8, channels=1, center_crop=True)(image)
    assert rgb.shape == (3, 8, 8) and grey.shape == (1, 8, 8) and rgb.dtype == torch.float32
    assert -1.0 <= rgb.min() and rgb.max() <= 1.0
    # Shorter side to 8 (30x20 -> 12x8), centre crop: the columns 2..9 of the resized image.
    resized = np.asarray(image.resize((12, 8), Image.BILINEAR), dtype=np.float32) / 127.5 - 1
    assert torch.allclose(rgb, torch.from_numpy(resized[:, 2:10].transpose(2, 0, 1).copy()))
    white = Image.new("L", (5, 5), 255)
    assert torch.all(ImageTransform(4, channels=1, center_crop=True)(white) == 1.0)
    with pytest.raises(ValueError, match="1 \\(grey\\) or 3 \\(RGB\\)"):
        ImageTransform(8, channels=4)


def test_random_crop_and_flip_follow_the_generator():
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (10, 16, 3), dtype=np.uint8))
    transform = ImageTransform(8, channels=3, random_flip=True)
    outputs = [transform(image, torch.Generator().manual_seed(seed)) for seed in range(12)]
    again = transform(image, torch.Generator().manual_seed(3))
    assert torch.equal(outputs[3], again)
    assert len({out.numpy().tobytes() for out in outputs}) > 3  # crops and flips vary with the seed
    centre = ImageTransform(8, channels=3, center_crop=True, random_flip=True)
    flips = {bool(torch.equal(centre(image, torch.Generator().manual_seed(s)), centre(image).flip(-1)))
             for s in range(12)}
    assert flips == {True, False}  # a flip is an exact mirror, and happens for some seeds only


def _train_images(dataset, **kwargs):
    return TrainImages(dataset, "image", ImageTransform(8, channels=3, random_flip=True), seed=5, **kwargs)


def test_augmentation_is_fixed_by_seed_epoch_and_index(tiny_imagefolder, tmp_path):
    dataset = load_image_dataset(train_data_dir=str(tiny_imagefolder), cache_dir=str(tmp_path))
    first, second = _train_images(dataset, keep_columns=["label"]), _train_images(dataset)
    forward = [first[i]["pixel_values"] for i in range(12)]
    backward = {i: second[i]["pixel_values"] for i in reversed(range(12))}
    assert all(torch.equal(forward[i], backward[i]) for i in range(12))  # order of access does not matter
    batch = first.__getitems__([3, 7, 1])
    assert all(torch.equal(item["pixel_values"], forward[i]) for item, i in zip(batch, [3, 7, 1]))
    assert [item["label"] for item in batch] == [dataset[i]["label"] for i in (3, 7, 1)]
    second.start_epoch(1)
    assert any(not torch.equal(forward[i], second[i]["pixel_values"]) for i in range(12))


def test_shuffle_is_a_permutation_fixed_by_seed_and_epoch(tiny_imagefolder, tmp_path):
    dataset = load_image_dataset(train_data_dir=str(tiny_imagefolder), cache_dir=str(tmp_path))
    train_images = _train_images(dataset)
    sampler = EpochShuffle(train_images)
    epoch0, epoch0_again = list(sampler), list(sampler)
    train_images.start_epoch(1)
    epoch1 = list(sampler)
    assert sorted(epoch0) == list(range(12)) and epoch0 == epoch0_again and epoch1 != epoch0


def test_dataloader_leaves_the_global_rng_alone(tiny_imagefolder, tmp_path):
    dataset = load_image_dataset(train_data_dir=str(tiny_imagefolder), cache_dir=str(tmp_path))
    loader = train_dataloader(_train_images(dataset), batch_size=5)
    state = torch.get_rng_state()
    batches = [batch["pixel_values"] for batch in loader]
    assert torch.equal(state, torch.get_rng_state())
    assert [len(batch) for batch in batches] == [5, 5, 2] and batches[0].shape[1:] == (3, 8, 8)


def test_an_undecodable_image_is_named_when_read(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    Image.new("RGB", (8, 8), "red").save(folder / "fine.png")
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), "blue").save(buffer, format="PNG")
    (folder / "truncated.png").write_bytes(buffer.getvalue()[:60])  # a valid header, then nothing
    dataset = load_image_dataset(train_data_dir=str(folder), cache_dir=str(tmp_path / "cache"))
    train_images = TrainImages(dataset, "image", ImageTransform(8), seed=0)
    errors = []
    for index in range(2):
        try:
            train_images[index]
        except ValueError as error:
            errors.append(str(error))
    assert len(errors) == 1 and "truncated.png (column 'image')" in errors[0]


def _array_dataset(images, labels):
    import datasets

    shape = images.shape[1:]
    array = datasets.Array2D(shape, "uint8") if len(shape) == 2 else datasets.Array3D(shape, "uint8")
    return datasets.Dataset.from_dict({"image": images, "label": labels},
                                      features=datasets.Features({"image": array, "label": datasets.Value("int64")}))


@pytest.mark.parametrize("center_crop", [False, True])
def test_prepared_images_give_the_streaming_tensors_flips_included(center_crop):
    digits = load_mnist("test").select(range(300, 0, -3))  # an indices mapping, as after a shuffle or a select
    transform = ImageTransform(16, channels=1, center_crop=center_crop, random_flip=True)
    prepared = PreparedTrainImages(digits, "image", transform, seed=4, keep_columns=["label"])
    streaming = TrainImages(digits, "image", transform, seed=4, keep_columns=["label"])
    plain = PreparedTrainImages(digits, "image", ImageTransform(16, channels=1), seed=4)
    plain = [item["pixel_values"] for item in plain.__getitems__(list(range(len(digits))))]
    flipped = set()
    for epoch in (0, 3):
        prepared.start_epoch(epoch)
        streaming.start_epoch(epoch)
        indices = list(range(len(digits)))
        fast, slow = prepared.__getitems__(indices), streaming.__getitems__(indices)
        assert all(torch.equal(a["pixel_values"], b["pixel_values"]) and a["label"] == b["label"]
                   for a, b in zip(fast, slow))
        mirrored = [torch.equal(item["pixel_values"], unflipped.flip(-1)) for item, unflipped in zip(fast, plain)]
        assert all(mirrored[i] or torch.equal(item["pixel_values"], plain[i]) for i, item in enumerate(fast))
        flipped.add(tuple(mirrored))
    assert len(flipped) == 2  # the flips differ between epochs
    batch = next(iter(train_dataloader(prepared, batch_size=8)))
    assert batch["pixel_values"].shape == (8, 1, 16, 16) and batch["label"].shape == (8,)


def test_train_images_for_picks_memory_for_square_arrays_only(tiny_imagefolder, tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    colour = _array_dataset(rng.integers(0, 256, (6, 12, 12, 3), dtype=np.uint8), list(range(6)))
    transform = ImageTransform(8, channels=3, random_flip=True)
    prepared = train_images_for(colour, "image", transform, seed=1)
    assert type(prepared) is PreparedTrainImages
    streaming = TrainImages(colour, "image", transform, seed=1)
    assert all(torch.equal(prepared[i]["pixel_values"], streaming[i]["pixel_values"]) for i in range(6))

    wide = _array_dataset(rng.integers(0, 256, (4, 10, 14), dtype=np.uint8), list(range(4)))
    assert type(train_images_for(wide, "image", transform, seed=1)) is TrainImages  # a random crop: per step
    with pytest.raises(ValueError, match="'image' does not hold square arrays"):
        PreparedTrainImages(wide, "image", transform)
    folder = load_image_dataset(train_data_dir=str(tiny_imagefolder), cache_dir=str(tmp_path))
    assert type(train_images_for(folder, "image", transform)) is TrainImages  # files: decoded per step
    monkeypatch.setattr(train_images_module, "PREPARED_BYTES_LIMIT", 6 * 8 * 8 * 3 - 1)  # one byte short of `colour`
    assert type(train_images_for(colour, "image", transform)) is TrainImages
