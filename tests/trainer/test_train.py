"""End-to-end on tiny towers: `imgtxt train` -> checkpoints/metrics -> `imgtxt export` -> `imgtxt eval` both ways."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from evaluation import cli as evaluate
from imgtxt.bundle import load_bundle
from trainer import export, train
from trainer.checkpoint import load_checkpoint


def _train(data: Path, out: Path, cache: Path, *extra: str) -> None:
    sets = [f"cache_dir={cache}", "train_limit=0", "val_limit=0"]
    argv = ["--recipe", "tiny", "--data", str(data), "--out", str(out), *(f"--set={s}" for s in sets), *extra]
    assert train.main(argv) == 0


@pytest.fixture(scope="module")
def run_dir(synthetic_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("run")
    _train(synthetic_data, root / "run", root / "cache", "--set", "epochs=2")
    return root / "run"


def test_one_run_writes_config_checkpoints_and_metrics(run_dir: Path) -> None:
    assert (run_dir / "config.yaml").is_file()
    assert (run_dir / "checkpoints" / "last.pt").is_file() and (run_dir / "checkpoints" / "best.pt").is_file()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    for r in records:
        assert 0 <= r["rsum"] <= 600 and r["train_loss"] > 0
    best = load_checkpoint(run_dir / "checkpoints" / "best.pt")
    assert best.metrics["rsum"] == max(r["rsum"] for r in records)
    assert best.config["model"]["image_backbone"] == "tiny"
    # The training curves: one picture of the loss terms and val R@K per epoch, redrawn each epoch.
    import numpy as np
    from PIL import Image

    with Image.open(run_dir / "curves.png") as curves:
        assert curves.format == "PNG" and curves.size[0] > 800 and curves.size[1] > 300
        assert len(np.unique(np.asarray(curves.convert("L")))) > 20  # lines and text drawn, not a blank canvas


def _init_and_trained(run: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    from trainer.config import load_config
    from trainer.model import DualEncoder

    cfg = load_config(None, run / "config.yaml")
    torch.manual_seed(cfg.run.seed)
    init = DualEncoder(cfg.model).state_dict()
    return init, load_checkpoint(run / "checkpoints" / "last.pt").model.state_dict()


def test_training_changes_the_heads_but_not_frozen_stages(run_dir: Path) -> None:
    init, trained = _init_and_trained(run_dir)
    assert torch.equal(init["image.stages.0.0.weight"], trained["image.stages.0.0.weight"])
    assert not torch.equal(init["image.head.linear.weight"], trained["image.head.linear.weight"])


def test_resume_continues_from_last_epoch_with_cached_activations(synthetic_data: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    # Fine-tuning the top stages from activations cached below them (the default recipe's shape).
    tune = ["--set", "image_trainable_stages=1", "--set", "text_trainable_layers=1"]
    _train(synthetic_data, tmp_path / "r", cache, "--set", "epochs=1", *tune)
    cached = sorted(p.name for p in cache.iterdir())
    assert len(cached) == 2 and all("-i2-t1-" in name for name in cached)  # train + val, split below the top stage
    _train(synthetic_data, tmp_path / "r", cache, "--set", "epochs=2", "--resume", *tune)
    epochs = [json.loads(line)["epoch"] for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2]
    assert sorted(p.name for p in cache.iterdir()) == cached  # the second run reused the feature cache


def test_pixel_path_with_augmentation_and_finetuning(synthetic_data: Path, tmp_path: Path) -> None:
    sets = ["cache_features=false", "image_trainable_stages=1", "text_trainable_layers=1", "pooling=gpo"]
    losses = "losses={vsepp_triplet: 1.0, infonce: 0.5}"
    _train(synthetic_data, tmp_path / "r", tmp_path / "cache", *(f"--set={s}" for s in [*sets, losses]))
    assert not (tmp_path / "cache").exists()
    init, trained = _init_and_trained(tmp_path / "r")
    assert torch.equal(init["image.stages.0.0.weight"], trained["image.stages.0.0.weight"])  # frozen
    assert not torch.equal(init["image.stages.2.0.weight"], trained["image.stages.2.0.weight"])  # top stage tuned
    assert not torch.equal(init["text.layers.0.qkv.weight"], trained["text.layers.0.qkv.weight"])


def test_export_then_eval_bundle_matches_checkpoint(run_dir: Path, synthetic_data: Path, tmp_path: Path) -> None:
    assert export.main(["--run", str(run_dir), "--out", str(tmp_path / "bundle"), "--version", "t1"]) == 0
    bundle = load_bundle(tmp_path / "bundle")
    assert bundle.version == "t1" and bundle.manifest.training["model"]["image_backbone"] == "tiny"
    # The bundle carries the figures of the checkpoint it was exported from.
    best = load_checkpoint(run_dir / "checkpoints" / "best.pt").metrics
    assert bundle.manifest.metrics["rsum"] == pytest.approx(best["rsum"])
    a, b = tmp_path / "onnx.json", tmp_path / "torch.json"
    assert evaluate.main(["--bundle", str(tmp_path / "bundle"), "--data", str(synthetic_data), "--json", str(a)]) == 0
    ckpt = str(run_dir / "checkpoints" / "best.pt")
    assert evaluate.main(["--checkpoint", ckpt, "--data", str(synthetic_data), "--json", str(b)]) == 0
    onnx_m, torch_m = json.loads(a.read_text()), json.loads(b.read_text())
    assert onnx_m["n_images"] == 8 and onnx_m["n_texts"] == 16
    assert onnx_m["rsum"] == pytest.approx(torch_m["rsum"])
    # The checkpoint evaluated from pixels agrees with the cached-feature validation during training.
    assert torch_m["rsum"] == pytest.approx(load_checkpoint(run_dir / "checkpoints" / "best.pt").metrics["rsum"])


def test_flip_averaged_model_validates_evaluates_and_exports_alike(synthetic_data: Path, tmp_path: Path) -> None:
    """flip_average: cached validation (mirrored val view), eval from pixels and the exported graph give one figure."""
    cache = tmp_path / "cache"
    _train(synthetic_data, tmp_path / "r", cache, "--set", "flip_average=true", "--set", "image_trainable_stages=1")
    ckpt = load_checkpoint(tmp_path / "r" / "checkpoints" / "best.pt")
    assert ckpt.model.spec.flip_average
    val = [torch.load(p, weights_only=True) for p in cache.iterdir()]
    assert sorted(v["image_mirror"] is not None for v in val) == [False, True]  # only the val split has the mirror
    assert export.main(["--run", str(tmp_path / "r"), "--out", str(tmp_path / "b")]) == 0
    assert export.main(["--run", str(tmp_path / "r"), "--out", str(tmp_path / "b_plain"), "--no-flip-average"]) == 0
    out = {}
    for name, argv in {
        "torch": ["--checkpoint", str(tmp_path / "r" / "checkpoints" / "best.pt")],
        "onnx": ["--bundle", str(tmp_path / "b")],
        "plain": ["--bundle", str(tmp_path / "b_plain")],
    }.items():
        assert evaluate.main([*argv, "--data", str(synthetic_data), "--json", str(tmp_path / f"{name}.json")]) == 0
        out[name] = json.loads((tmp_path / f"{name}.json").read_text())
    assert load_bundle(tmp_path / "b").manifest.training["export"]["flip_average"] is True
    assert load_bundle(tmp_path / "b_plain").manifest.training["export"]["flip_average"] is False
    assert out["onnx"]["rsum"] == pytest.approx(out["torch"]["rsum"]) == pytest.approx(ckpt.metrics["rsum"])
    # The default export is the flip-averaged graph (mirror-invariant), `--no-flip-average` the plain one.
    import numpy as np
    import onnxruntime as ort

    from trainer.export import parity_image_inputs

    pixels = parity_image_inputs(load_bundle(tmp_path / "b").manifest.image_preprocess, count=3)
    mirrored = np.ascontiguousarray(pixels[..., ::-1])
    for name, invariant in (("b", True), ("b_plain", False)):
        session = ort.InferenceSession(str(tmp_path / name / "image_tower.onnx"), providers=["CPUExecutionProvider"])
        a, b = (session.run(["embedding"], {"pixel_values": x})[0] for x in (pixels, mirrored))
        assert (np.abs(a - b).max() < 1e-5) == invariant


def test_hierarchical_option_serves_one_concatenated_vector(synthetic_data: Path, tmp_path: Path) -> None:
    import numpy as np
    import onnxruntime as ort

    from imgtxt.preprocess import preprocess_image

    _train(synthetic_data, tmp_path / "r", tmp_path / "cache", "--set", "local_dim=8", "--set", "with_unit=false")
    records = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["train_local_mse"] >= 0  # the local loss was trained
    assert export.main(["--run", str(tmp_path / "r"), "--out", str(tmp_path / "b")]) == 0
    m = load_bundle(tmp_path / "b").manifest
    assert m.embedding_dim == 32 + 8 and m.unit is None
    image = next((synthetic_data.parent / "img").iterdir())
    pixels = preprocess_image(image.read_bytes(), m.image_preprocess)[None]
    sess = ort.InferenceSession(str(tmp_path / "b" / m.image.file), providers=["CPUExecutionProvider"])
    (emb,) = sess.run(["embedding"], {"pixel_values": pixels})
    assert emb.shape == (1, 40)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)


def test_loss_table_benchmark_runs_each_option(synthetic_data: Path, tmp_path: Path) -> None:
    from benchmarks import train_losses

    argv = ["--recipe", "tiny", "--data", str(synthetic_data), "--out", str(tmp_path / "runs")]
    # bcls_sn_image0.1 builds both continuous labels (text_sim, image_text_sim) from the feature cache.
    options = "vsepp_triplet,vsepp+relation,infonce+hierarchical,bcls_sn_image0.1"
    argv += ["--results", str(tmp_path / "results"), "--options", options]
    argv += ["--set", f"cache_dir={tmp_path / 'cache'}"]
    assert train_losses.main(argv) == 0
    rows = json.loads((tmp_path / "results" / "train_losses.json").read_text())["rows"]
    table = (tmp_path / "results" / "train_losses.md").read_text()
    assert "| vsepp+relation |" in table
    # The HREM comparison has both its options; the hierarchical one lacks its baseline (infonce_global) and is left
    # out.
    assert "| HREM (seed 002) | vsepp+relation | vsepp_triplet |" in table and "Hierarchical (seed 000)" not in table
    assert [r["option"] for r in rows] == options.split(",")
    assert all("error" not in r and 0 <= r["rsum"] <= 600 for r in rows)
    hier = load_checkpoint(tmp_path / "runs" / "tiny-infonce_hierarchical" / "checkpoints" / "best.pt")
    assert hier.config["model"]["local_dim"] == 128 and hier.config["model"]["with_unit"] is False
    bcls = json.loads((tmp_path / "runs" / "tiny-bcls_sn_image0.1" / "metrics.jsonl").read_text().splitlines()[-1])
    assert bcls["train_kendall"] > 0 and "train_soft_triplet" in bcls
    # --reuse reads the finished runs back instead of training them again (same figures, no wall time).
    assert train_losses.main([*argv, "--reuse", "--tag", "again"]) == 0
    again = json.loads((tmp_path / "results" / "train_losses_again.json").read_text())["rows"]
    assert [r["wall_s"] for r in again] == ["reused"] * 4
    assert [r["rsum"] for r in again] == [r["rsum"] for r in rows]


def test_serving_variants_benchmark_matches_the_exported_variants(
    run_dir: Path, synthetic_data: Path, tmp_path: Path
) -> None:
    """Each (side, flip) row of the benchmark is the rSum of `imgtxt export --image-size N [--flip-average]`."""
    from benchmarks import serving_variants

    ckpt = run_dir / "checkpoints" / "best.pt"
    argv = ["--checkpoint", str(ckpt), "--data", str(synthetic_data), "--sizes", "32,48", "--results", str(tmp_path)]
    assert serving_variants.main(argv) == 0
    written = json.loads((tmp_path / "serving_variants.json").read_text())["rows"]
    rows = {(r["image_size"], r["flip_average"]): r for r in written}
    assert sorted(rows) == [(32, False), (32, True), (48, False), (48, True)]
    assert rows[32, False]["rsum"] == pytest.approx(load_checkpoint(ckpt).metrics["rsum"])
    for size, flip in ((48, False), (32, True)):
        bundle = tmp_path / f"b{size}{flip}"
        flags = ["--image-size", str(size), "--flip-average" if flip else "--no-flip-average"]
        assert export.main(["--run", str(run_dir), "--out", str(bundle), *flags]) == 0
        assert load_bundle(bundle).manifest.image_preprocess.image_size == size
        out = tmp_path / f"e{size}{flip}.json"
        assert evaluate.main(["--bundle", str(bundle), "--data", str(synthetic_data), "--json", str(out)]) == 0
        assert json.loads(out.read_text())["rsum"] == pytest.approx(rows[size, flip]["rsum"])


def test_weight_average_ramps_its_decay_and_swaps_weights_in_and_out() -> None:
    from trainer.optim import WeightAverage

    p = torch.nn.Parameter(torch.zeros(2))
    average = WeightAverage([p], decay=0.9)
    with torch.no_grad():
        p.fill_(1.0)
    average.update()  # decay min(0.9, 2/11): the average moves 9/11 of the way
    assert torch.allclose(average.shadow[0], torch.full((2,), 9 / 11))
    with average.applied():
        assert torch.allclose(p.detach(), torch.full((2,), 9 / 11))
    assert torch.equal(p.detach(), torch.ones(2))


def test_weight_average_is_validated_kept_as_best_and_resumed(synthetic_data: Path, tmp_path: Path) -> None:
    run = tmp_path / "r"
    _train(synthetic_data, run, tmp_path / "cache", "--set", "epochs=1", "--set", "ema_decay=0.9")
    last = load_checkpoint(run / "checkpoints" / "last.pt")
    best = load_checkpoint(run / "checkpoints" / "best.pt")  # epoch 1 is the best so far: it holds the average
    average = last.state["average"]
    steps = last.state["step"]
    assert average["updates"] == steps > 0
    head = "image.head.linear.weight"
    assert not torch.equal(last.model.state_dict()[head], best.model.state_dict()[head])  # raw vs averaged
    assert any(torch.equal(best.model.state_dict()[head], s) for s in average["shadow"])
    _train(synthetic_data, run, tmp_path / "cache", "--set", "epochs=2", "--set", "ema_decay=0.9", "--resume")
    assert load_checkpoint(run / "checkpoints" / "last.pt").state["average"]["updates"] == 2 * steps


def test_dev_split_is_held_out_of_training_and_chooses_the_epoch(synthetic_data: Path, tmp_path: Path) -> None:
    from trainer.config import load_config
    from trainer.train import Trainer

    cache = tmp_path / "cache"
    sets = [f"cache_dir={cache}", "train_limit=0", "val_limit=0", "dev_images=4", "epochs=3"]
    cfg = load_config("tiny", None, [f"data={synthetic_data}", *sets])
    trainer = Trainer(cfg, tmp_path / "r").setup()
    assert trainer.dev_table is not None
    train_keys = {im.key for im in trainer.train_table.images}
    dev_keys = [im.key for im in trainer.dev_table.images]
    # The last 4 of the 16 training images, none of them trained on, served from the full split's cache.
    assert dev_keys == [im.key for im in trainer.full_train_table.images[-4:]] and not train_keys & set(dev_keys)
    batches = np.concatenate(trainer._epoch_batches(0))
    assert sorted(batches.tolist()) == list(range(len(trainer.train_table.captions)))
    full = trainer.full_train_table
    n_cap = len(trainer.train_table.captions)
    assert trainer.dev_source is not None
    dev_text, _ = trainer.dev_source.texts(np.arange(len(trainer.dev_table.captions)))
    whole_text, _ = trainer.train_source.texts(np.arange(n_cap))
    assert dev_text.shape[0] == len(full.captions) - n_cap and whole_text.shape[0] == n_cap
    trainer.fit()
    records = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert all("dev_rsum" in r and "rsum" in r for r in records)
    best = load_checkpoint(tmp_path / "r" / "checkpoints" / "best.pt")
    chosen = max(records, key=lambda r: r["dev_rsum"])  # the first epoch of a tie, as `>` keeps it
    assert best.metrics["dev_rsum"] == chosen["dev_rsum"] and best.metrics["rsum"] == chosen["rsum"]
    assert len(list(cache.iterdir())) == 2  # one cache of the full training split, one of val


def test_dev_split_must_leave_training_images(synthetic_data: Path, tmp_path: Path) -> None:
    from imgtxt.errors import ConfigError
    from trainer.config import load_config
    from trainer.train import Trainer

    cfg = load_config("tiny", None, [f"data={synthetic_data}", "train_limit=0", "dev_images=16"])
    with pytest.raises(ConfigError, match="dev_images=16 must be below the 16 training images"):
        Trainer(cfg, tmp_path / "r").setup()
    with pytest.raises(ConfigError, match="flip_average"):
        load_config("tiny", None, ["dev_images=4", "flip_average=true"])
