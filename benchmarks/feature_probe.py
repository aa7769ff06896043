"""Linear probe: how much of a demo image's colour / position / shape the adapter outputs carry.

Draws fresh one-shape scenes with the demo generator (`sail_jax.evaluation.demo`), runs them through the ViT +
pixel-shuffle adapter of `configs/demo.gin` (random init at the configured `init_std`, or a trained checkpoint),
and fits ridge classifiers on the LLM-space features pooled three ways (mean, max, all tokens flattened). It is
what shows that the demo's random ViT already separates the three properties, so the LLM's readout, not the ViT,
limits what the demo learns (configs/demo.gin, BUILD.md "The demo's accuracy").

    python benchmarks/feature_probe.py [--checkpoint DIR] [--adapter-init-std 0.02] [--train 1000] [--test 300]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import gin  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

from sail_jax.data.processor import SailProcessor  # noqa: E402
from sail_jax.evaluation.demo import COLORS, POSITIONS, SHAPES, draw_scene, random_scene  # noqa: E402
from sail_jax.models.sail_vl import SailVL  # noqa: E402
from sail_jax.training import gin_setup  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PROPERTIES = {"color": list(COLORS), "position": list(POSITIONS), "shape": list(SHAPES)}


def demo_model(init_std: float | None, seed: int):
    """(config, params) of configs/demo.gin's model at its random init."""
    bindings = ["WORKDIR='unused'", "grain_data.datasets=[]", "grain_data.tokenizer_dir='assets/tokenizer'"]
    if init_std is not None:
        bindings.append(f"AdapterConfig.init_std = {init_std}")
    gin_setup.parse([str(REPO / "configs/demo.gin")], bindings)
    cfg = gin_setup.model_config(**gin.get_bindings("model_config"))
    tile = np.zeros((1, 3, cfg.vision.image_size, cfg.vision.image_size), np.float32)
    return cfg, SailVL(cfg).init(jax.random.PRNGKey(seed), tile, method=SailVL.extract_feature)


def features(cfg, params, ns: tuple[int, ...], rng: np.random.Generator) -> list[tuple[np.ndarray, dict]]:
    """For each n in `ns`: [n, tokens, D] adapter outputs of n fresh one-shape scenes and each property's class."""
    proc = SailProcessor.from_dir(REPO / "assets/tokenizer", max_num=1, image_size=cfg.vision.image_size)
    extract = jax.jit(lambda p, x: SailVL(cfg).apply(p, x, method=SailVL.extract_feature))
    return [_scene_features(proc, extract, params, n, rng) for n in ns]


def _scene_features(proc, extract, params, n: int, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    images, labels = [], {k: [] for k in PROPERTIES}
    for _ in range(n):
        scene = random_scene(rng, 1, True)
        images.append(draw_scene(scene))
        shape = scene["shapes"][0]
        for key, value in (("color", shape["color"]), ("position", scene["position"]), ("shape", shape["shape"])):
            labels[key].append(PROPERTIES[key].index(value))
    pixels = proc.preprocess_images(images)["pixel_values"]
    feats = np.concatenate([np.asarray(extract(params, pixels[i:i + 50])) for i in range(0, n, 50)])
    return feats, {k: np.array(v) for k, v in labels.items()}


def ridge_accuracy(x_train, y_train, x_test, y_test) -> float:
    """Best held-out accuracy of a one-vs-all ridge classifier on standardised features over a few penalties."""
    mu, sd = x_train.mean(0), x_train.std(0) + 1e-6
    a, b = (x_train - mu) / sd, (x_test - mu) / sd
    onehot = np.eye(int(y_train.max()) + 1)[y_train]
    best = 0.0
    for lam in (1e-3, 1e-2, 1e-1):
        w = np.linalg.solve(a.T @ a + lam * len(a) * np.eye(a.shape[1]), a.T @ onehot)
        best = max(best, float(((b @ w).argmax(1) == y_test).mean()))
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", help="a trained checkpoint (e.g. demo_out/run/checkpoints/400) instead of init")
    p.add_argument("--adapter-init-std", type=float, help="override configs/demo.gin's adapter init_std")
    p.add_argument("--train", type=int, default=1000)
    p.add_argument("--test", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if args.checkpoint:
        from converters.load import load_checkpoint

        cfg, params = load_checkpoint(args.checkpoint)
        what = args.checkpoint
    else:
        cfg, params = demo_model(args.adapter_init_std, args.seed)
        what = f"configs/demo.gin at random init (adapter init_std {cfg.adapter.init_std})"
    rng = np.random.default_rng(args.seed + 1)
    (f_train, y_train), (f_test, y_test) = features(cfg, params, (args.train, args.test), rng)
    print(f"{what}: {f_train.shape[1]} tokens x {f_train.shape[2]} per image; ridge probe on {args.train} "
          f"one-shape scenes, accuracy on {args.test} others (chance: colour 20%, position 25%, shape 33%)")
    for name, pool in (("mean", lambda f: f.mean(1)), ("max", lambda f: f.max(1)),
                       ("all tokens", lambda f: f.reshape(len(f), -1))):
        accs = {k: ridge_accuracy(pool(f_train), y_train[k], pool(f_test), y_test[k]) for k in PROPERTIES}
        print(f"{name:10s} " + "  ".join(f"{k} {v:6.1%}" for k, v in accs.items()))


if __name__ == "__main__":
    main()
