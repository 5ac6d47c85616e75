"""The nerfstudio back-end with FAKE ns-train / ns-export scripts (nerfstudio itself is
never installed or imported here). The fakes check the dataset's conventions the way
nerfstudio's `nerfstudio-data` parser reads them, write a dataparser transform with a
real rotation, centring and scale, and export known Gaussians in nerfstudio's
normalised frame; the Scene must come back in our frame exactly."""
import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from recon import cameras
from recon.config import FitConfig, build_config
from recon.errors import MissingError, StageError, UsageError
from recon.fit.nerfstudio import (find_nerfstudio, fit_nerfstudio, parse_step, read_ply_vertices, rotate_sh,
                                  write_nerfstudio_dataset)
from tests.test_fit import sphere_views

FAKE_TRAIN = r'''
import json, os, sys
from pathlib import Path
import numpy as np

args = sys.argv[1:]
method = args[0]
def opt(name, default=None):
    return args[args.index(name) + 1] if name in args else default
assert args.count("--data") == 1 and args.index("nerfstudio-data") < args.index("--data"), args
assert opt("--orientation-method") == "none" and opt("--center-method") == "poses", args
assert opt("--viewer.quit-on-train-completion") == "True" and opt("--vis") == "tensorboard", args
Path(os.environ["FAKE_NS_ARGV"]).open("a").write(json.dumps(args) + "\n")
data = Path(opt("--data"))
meta = json.loads((data / "transforms.json").read_text())
errors = []
names = []
for fr in meta["frames"]:
    T = np.array(fr["transform_matrix"])
    pos, fwd_gl, up_gl = T[:3, 3], -T[:3, 2], T[:3, 1]      # OpenGL: camera looks down -z, y is up
    if T.shape != (4, 4) or abs(np.linalg.det(T[:3, :3]) - 1) > 1e-6:
        errors.append("pose is not a rigid 4x4")
    if fwd_gl @ (-pos / np.linalg.norm(pos)) < 0.999:
        errors.append(f"{fr['file_path']}: camera does not look at the head (OpenGL -z)")
    if up_gl[1] < 0.5:
        errors.append(f"{fr['file_path']}: camera y axis is not up (OpenGL)")
    if abs(fr["fl_x"] - 4.2647 * fr["w"]) > 1e-3 or abs(fr["cx"] - fr["w"] / 2) > 1e-6:
        errors.append("intrinsics are not in pixels")
    png = (data / fr["file_path"]).read_bytes()
    if png[:8] != b"\x89PNG\r\n\x1a\n" or png[25] != 6:      # colour type 6 = RGBA
        errors.append(f"{fr['file_path']} is not an RGBA PNG")
    names.append(fr["file_path"])
for split in ("train", "val", "test"):
    if not set(meta[f"{split}_filenames"]) <= set(names) or not meta[f"{split}_filenames"]:
        errors.append(f"bad {split} split")
if errors:
    print("\n".join(errors), file=sys.stderr)
    sys.exit(3)
if os.environ.get("FAKE_NS_FAIL"):
    print("CUDA out of memory (fake)", file=sys.stderr)
    sys.exit(1)
run = Path(opt("--output-dir")) / opt("--experiment-name") / method / opt("--timestamp")
(run / "nerfstudio_models").mkdir(parents=True, exist_ok=True)
(run / "config.yml").write_text(f"method_name: {method}\n")
T = json.loads(os.environ["FAKE_NS_TRANSFORM"])
(run / "dataparser_transforms.json").write_text(json.dumps(T))
steps = int(opt("--max-num-iterations"))
print("Step (% Done)       Train Iter (time)    ETA (time)")
print("----------------------------------------------------")
for s in range(0, steps, max(1, steps // 5)):
    print(f"\x1b[1m{s} ({100 * s / steps:.2f}%)\x1b[0m       12.345 ms            1 m, 2 s")
(run / "nerfstudio_models" / f"step-{steps - 1:09d}.ckpt").write_bytes(b"")
'''

FAKE_EXPORT = r'''
import os, sys
from pathlib import Path
import numpy as np

kind, args = sys.argv[1], sys.argv[2:]
opt = lambda n: args[args.index(n) + 1]
assert Path(opt("--load-config")).is_file()
out = Path(opt("--output-dir"))
z = np.load(os.environ["FAKE_NS_SPLATS"])
n = z["means"].shape[0]
if kind == "gaussian-splat":
    K = z["shN"].shape[1]
    cols = {"x": z["means"][:, 0], "y": z["means"][:, 1], "z": z["means"][:, 2]}
    for i in range(3):
        cols[f"nx" if i == 0 else ("ny" if i == 1 else "nz")] = np.zeros(n)
    for i in range(3):
        cols[f"f_dc_{i}"] = z["sh0"][:, 0, i]
    rest = z["shN"].transpose(0, 2, 1).reshape(n, 3 * K)       # channel-major, as INRIA / nerfstudio
    for i in range(3 * K):
        cols[f"f_rest_{i}"] = rest[:, i]
    cols["opacity"] = z["opacities"]
    for i in range(3):
        cols[f"scale_{i}"] = z["scales"][:, i]
    for i in range(4):
        cols[f"rot_{i}"] = z["quats"][:, i]
    dt = np.dtype([(k, "<f4") for k in cols])
    rec = np.empty(n, dt)
    for k, v in cols.items():
        rec[k] = v
    head = "ply\nformat binary_little_endian 1.0\nelement vertex %d\n" % n
    head += "".join(f"property float {k}\n" for k in cols) + "end_header\n"
    (out / "splat.ply").write_bytes(head.encode() + rec.tobytes())
elif kind == "pointcloud":
    rgb = np.clip(np.round(z["rgb"] * 255), 0, 255).astype(int)
    lines = ["ply", "format ascii 1.0", f"element vertex {n}", "property double x", "property double y",
             "property double z", "property uchar red", "property uchar green", "property uchar blue", "end_header"]
    lines += [f"{p[0]:.9f} {p[1]:.9f} {p[2]:.9f} {c[0]} {c[1]} {c[2]}" for p, c in zip(z["means"], rgb)]
    (out / "point_cloud.ply").write_text("\n".join(lines) + "\n")
else:
    sys.exit(2)
'''


def _write_fakes(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, body in (("ns-train", FAKE_TRAIN), ("ns-export", FAKE_EXPORT)):
        p = folder / name
        p.write_text(f"#!{sys.executable}\n" + body)
        p.chmod(0o755)
    return folder


def _rot(axis, deg):
    a = np.asarray(axis, float) / np.linalg.norm(axis)
    t = math.radians(deg)
    Kx = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    return np.eye(3) + math.sin(t) * Kx + (1 - math.cos(t)) * Kx @ Kx


def _quat_to_mat(q):
    w, x, y, z = q / np.linalg.norm(q)
    return np.array([[1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
                     [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
                     [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)]])


def _sh1(d):
    """Degree-1 real SH basis (3DGS order), written out independently of the module."""
    c = 0.4886025119029199
    return np.stack([-c * d[:, 1], c * d[:, 2], -c * d[:, 0]], 1)


R_NS = _rot([0.3, 1.0, -0.2], 37.0)          # nerfstudio's orientation (a real rotation)
T_NS = np.array([0.05, -0.12, 0.31])
S_NS = 1 / 2.7 * 1.3


@pytest.fixture
def fake_ns(tmp_path, monkeypatch):
    bin_dir = _write_fakes(tmp_path / "nsbin")
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_NS_ARGV", str(tmp_path / "argv.jsonl"))
    monkeypatch.setenv("FAKE_NS_TRANSFORM", json.dumps({"transform": np.hstack([R_NS, T_NS[:, None]]).tolist(),
                                                         "scale": S_NS}))
    return tmp_path


def _known_world_gaussians(n=40, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(n, 4))
    return {"means": rng.uniform(-0.2, 0.2, (n, 3)), "quats": q / np.linalg.norm(q, axis=1, keepdims=True),
            "scales": np.log(rng.uniform(0.01, 0.03, (n, 3))), "opacities": rng.normal(size=n) + 2,
            "sh0": rng.normal(size=(n, 1, 3)) * 0.3}


def test_dataset_follows_nerfstudio_conventions(tmp_path):
    views = sphere_views(n=8, res=32, elev=(0.0,))
    folder = write_nerfstudio_dataset(views, tmp_path / "ds", resolution=24, holdout_every=4, masks=True,
                                      init_points=500)
    meta = json.loads((folder / "transforms.json").read_text())
    assert len(meta["frames"]) == 8
    for i, fr in enumerate(meta["frames"]):
        T = np.array(fr["transform_matrix"])
        np.testing.assert_allclose(T, cameras.to_opengl_c2w(views.c2w[i]), atol=1e-12)
        np.testing.assert_allclose(cameras.from_opengl_c2w(T), views.c2w[i], atol=1e-12)
        assert (fr["w"], fr["h"]) == (24, 24)
        assert fr["fl_x"] == pytest.approx(cameras.FOCAL_NORM * 24) and fr["cy"] == pytest.approx(12.0)
        assert (folder / fr["file_path"]).is_file() and (folder / fr["mask_path"]).is_file()
    # held-out views (every 4th) are nerfstudio's eval split
    assert meta["val_filenames"] == [meta["frames"][i]["file_path"] for i in (3, 7)]
    assert len(meta["train_filenames"]) == 6
    pts = read_ply_vertices(folder / meta["ply_file_path"])
    xyz = np.stack([pts["x"], pts["y"], pts["z"]], 1)
    assert xyz.shape == (500, 3) and np.linalg.norm(xyz, axis=1).max() < 0.4   # visual hull of a r=0.2 sphere
    from recon.imageio_safe import read_png_rgba

    img = read_png_rgba(folder / meta["frames"][0]["file_path"])
    assert img.shape == (24, 24, 4) and img[0, 0, 3] == 0 and img[12, 12, 3] == 255
    no_masks = write_nerfstudio_dataset(views, tmp_path / "ds2", init_points=0)
    meta2 = json.loads((no_masks / "transforms.json").read_text())
    assert "mask_path" not in meta2["frames"][0] and "ply_file_path" not in meta2
    assert meta2["frames"][0]["w"] == 32


def test_splatfacto_round_trip_returns_our_frame_exactly(fake_ns, monkeypatch):
    world = _known_world_gaussians()
    n = world["means"].shape[0]
    rng = np.random.default_rng(1)
    sh_ns = rng.normal(size=(n, 3, 3)) * 0.2                      # degree 1, nerfstudio frame
    # forward: what nerfstudio would hold, p_ns = s (R p + t), R_gauss_ns = R R_gauss
    from recon.export.splat_files import quat_mul as _quat_mul
    from recon.fit.nerfstudio import _quat_of_matrix

    ns = {"means": S_NS * (world["means"] @ R_NS.T + T_NS),
          "quats": _quat_mul(_quat_of_matrix(R_NS)[None], world["quats"]) * 1.7,   # unnormalised is allowed
          "scales": world["scales"] + math.log(S_NS), "opacities": world["opacities"], "sh0": world["sh0"],
          "shN": sh_ns}
    np.savez(fake_ns / "splats.npz", **ns)
    monkeypatch.setenv("FAKE_NS_SPLATS", str(fake_ns / "splats.npz"))
    views = sphere_views(n=8, res=32, elev=(0.0,))
    cfg = FitConfig(method="nerfstudio-splatfacto", steps=50, resolution=24, num_init=200, holdout_every=4)
    calls = []
    scene, metrics = fit_nerfstudio(views, cfg, fake_ns / "work", lambda s, t, m: calls.append((s, t, m)))
    p = {k: v.double().numpy() for k, v in scene.params.items()}
    np.testing.assert_allclose(p["means"], world["means"], atol=2e-6)
    np.testing.assert_allclose(p["scales"], world["scales"], atol=2e-6)
    np.testing.assert_allclose(p["opacities"], world["opacities"], atol=2e-6)
    np.testing.assert_allclose(p["sh0"], world["sh0"], atol=2e-6)
    for qa, qb in zip(p["quats"], world["quats"]):
        np.testing.assert_allclose(_quat_to_mat(qa), _quat_to_mat(qb), atol=2e-6)
    # view-dependent colour: for a world direction d, our SH must equal nerfstudio's at R d
    d = rng.normal(size=(64, 3))
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    ours = np.einsum("mk,nkc->nmc", _sh1(d), p["shN"])
    theirs = np.einsum("mk,nkc->nmc", _sh1(d @ R_NS.T), sh_ns)
    np.testing.assert_allclose(ours, theirs, atol=2e-6)
    assert scene.sh_degree == 1 and scene.num_gaussians == n
    # progress streamed from ns-train's step rows (ANSI codes stripped), then the read-back
    steps = [s for s, t, _ in calls]
    assert steps[:5] == [1, 11, 21, 31, 41] and calls[-1][0] == calls[-1][1] == 50
    assert metrics["test_views"] == [3, 7] and metrics["test_psnr"] is not None
    assert metrics["resumed_from_checkpoint"] is False
    # a rerun resumes from nerfstudio's checkpoint
    fit_nerfstudio(views, cfg, fake_ns / "work")
    argv = [json.loads(line) for line in (fake_ns / "argv.jsonl").read_text().splitlines()]
    assert "--load-dir" not in argv[0] and "--load-dir" in argv[1]
    assert argv[0][argv[0].index("--pipeline.model.sh-degree") + 1] == "1"


def test_nerfacto_point_cloud_becomes_small_opaque_gaussians(fake_ns, monkeypatch):
    rng = np.random.default_rng(2)
    world = rng.normal(size=(300, 3))
    world = 0.2 * world / np.linalg.norm(world, axis=1, keepdims=True)
    rgb = rng.uniform(0, 1, (300, 3))
    np.savez(fake_ns / "pc.npz", means=S_NS * (world @ R_NS.T + T_NS), rgb=rgb)
    monkeypatch.setenv("FAKE_NS_SPLATS", str(fake_ns / "pc.npz"))
    views = sphere_views(n=8, res=32, elev=(0.0,))
    cfg = FitConfig(method="nerfstudio-nerfacto", steps=10, resolution=24, holdout_every=4)
    scene, metrics = fit_nerfstudio(views, cfg, fake_ns / "work")
    p = {k: v.double().numpy() for k, v in scene.params.items()}
    np.testing.assert_allclose(p["means"], world, atol=1e-6)
    np.testing.assert_allclose(0.5 + 0.28209479177387814 * p["sh0"][:, 0], np.round(rgb * 255) / 255, atol=1e-6)
    assert scene.sh_degree == 0 and (1 / (1 + np.exp(-p["opacities"])) > 0.95).all()
    assert (np.exp(p["scales"]) < 0.05).all()
    assert "point cloud" in scene.meta["representation"]
    argv = json.loads((fake_ns / "argv.jsonl").read_text().splitlines()[0])
    assert argv[0] == "nerfacto"


def test_failing_ns_train_is_a_stage_error_with_its_last_lines(fake_ns, monkeypatch):
    monkeypatch.setenv("FAKE_NS_FAIL", "1")
    with pytest.raises(StageError) as e:
        fit_nerfstudio(sphere_views(n=8, res=32, elev=(0.0,)),
                       FitConfig(method="nerfstudio-splatfacto", steps=5, resolution=24, num_init=100),
                       fake_ns / "work")
    assert e.value.exit_code == 5 and "out of memory" in e.value.message
    assert (fake_ns / "work" / "nerfstudio.log").is_file()


def test_missing_nerfstudio_is_exit_4_with_an_install_hint(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))           # nothing there
    with pytest.raises(MissingError) as e:
        find_nerfstudio(FitConfig(method="nerfstudio-splatfacto"))
    assert e.value.exit_code == 4 and "ns-train" in e.value.message and "pip install nerfstudio" in e.value.hint
    assert "\n" not in e.value.one_line()
    with pytest.raises(MissingError):
        find_nerfstudio(FitConfig(nerfstudio_bin=str(tmp_path)))
    with pytest.raises(MissingError):
        find_nerfstudio(FitConfig(nerfstudio_python=str(tmp_path / "no-python")))
    # the interpreter route: a python without nerfstudio is refused (probed in a subprocess)
    with pytest.raises(MissingError) as e:
        find_nerfstudio(FitConfig(nerfstudio_python=sys.executable))
    assert "no nerfstudio package" in e.value.message
    # and the stage entry point says the same before writing anything big
    from recon import api

    with pytest.raises(MissingError):
        api.fit(sphere_views(n=4, res=16, elev=(0.0,)), FitConfig(method="nerfstudio-nerfacto"),
                checkpoint_dir=tmp_path / "ck")


def test_tools_found_in_a_configured_folder_and_doctor_sees_path(fake_ns):
    tools = find_nerfstudio(FitConfig(nerfstudio_bin=str(fake_ns / "nsbin")))
    assert tools.train[0].endswith("ns-train") and tools.export[0].endswith("ns-export")
    assert find_nerfstudio().source == "PATH"
    from recon.doctor import run_checks

    ns = [c for c in run_checks() if c["name"] == "nerfstudio"][0]
    assert ns["ok"] and "nsbin" in ns["detail"]


def test_config_knows_the_methods():
    assert build_config("default", {"fit": {"method": "nerfstudio-splatfacto"}}).fit.method == "nerfstudio-splatfacto"
    with pytest.raises(UsageError) as e:
        build_config("default", {"fit": {"method": "nerfstudio-splatfacta"}})
    assert "nerfstudio-splatfacto" in e.value.hint


def test_step_rows_and_sh_rotation():
    assert parse_step("\x1b[1m1230 (41.00%)\x1b[0m   10 ms  1 m") == 1230
    assert parse_step("\x1b[4A\x1b[1000D29990 (99.97%)      20.1 ms   0 s") == 29990   # the writer's cursor-up
    assert parse_step("Step (% Done)  Train Iter") is None and parse_step("[12:00:01] Saving checkpoint") is None
    rng = np.random.default_rng(3)
    R = _rot([1, 2, 3], 71)
    for deg in (1, 2, 3):
        K = (deg + 1) ** 2 - 1
        c = rng.normal(size=(5, K, 3))
        back = rotate_sh(rotate_sh(c, R), R.T)       # rotate there and back
        np.testing.assert_allclose(back, c, atol=1e-9)
