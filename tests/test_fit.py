"""The fit stage on tiny synthetic views: a coloured sphere rendered by ray casting."""
import numpy as np
import pytest
import torch

from recon import cameras
from recon.config import FitConfig
from recon.errors import InputError
from recon.fit.render import render_scene
from recon.fit.splat import CKPT_NAME, fit_splats, split_views, visual_hull, prepare_views
from recon.types import Scene, ViewSet

RADIUS = 0.2


pytestmark = pytest.mark.usefixtures("one_thread")


def sphere_views(n=8, res=32, elev=(0.0, 25.0), alpha=True):
    """Ray-cast a sphere (colour = 0.5 + 0.45 * normal) from PanoHead-convention cameras."""
    az = np.concatenate([np.linspace(0, 360, n, endpoint=False) + 11 * i for i in range(len(elev))])
    el = np.concatenate([np.full(n, e) for e in elev])
    c2w = cameras.orbit_cam2world(az, el)
    K = np.broadcast_to(cameras.INTRINSICS_NORM, (len(az), 3, 3)).copy()
    imgs = []
    for i in range(len(az)):
        o, d, _ = cameras.pixel_rays(c2w[i], K[i], res, res)
        b = d @ o
        disc = b * b - (o @ o - RADIUS ** 2)
        hit = disc > 0
        p = o + (-b - np.sqrt(np.maximum(disc, 0)))[..., None] * d
        rgb = np.clip(0.5 + 0.45 * p / RADIUS, 0, 1)
        img = np.zeros((res, res, 4), np.uint8)
        img[..., :3] = np.where(hit[..., None], rgb * 255 + 0.5, 255 if not alpha else 0).astype(np.uint8)
        img[..., 3] = np.where(hit, 255, 0) if alpha else 255
        imgs.append(img)
    return ViewSet(np.stack(imgs), c2w, K, [f"v{i:02d}.png" for i in range(len(az))], backend="test")


def tiny_cfg(**kw):
    base = dict(steps=20, resolution=24, num_init=300, max_gaussians=600, holdout_every=4, checkpoint_every=0,
                batch_views=2, sh_degree=1)
    base.update(kw)
    return FitConfig(**base)


def test_visual_hull_contains_the_sphere_and_little_else():
    data = prepare_views(sphere_views(res=32), 32)
    occ, bound = visual_hull(data["mask"], data["viewmats"], data["Ks"], grid=32)
    lin = (torch.arange(32) + 0.5) / 32 * 2 * bound - bound
    r = torch.stack(torch.meshgrid(lin, lin, lin, indexing="ij"), -1).norm(dim=-1)
    assert occ[r < RADIUS * 0.8].all()
    assert not occ[r > RADIUS * 1.6].any()


def test_split_views_holds_out_every_kth_but_not_the_front():
    assert split_views(9, 3) == ([0, 1, 3, 4, 6, 7], [2, 5, 8])
    assert split_views(5, 0) == ([0, 1, 2, 3, 4], [])


def test_fit_sphere_raises_psnr_and_matches_silhouettes():
    views = sphere_views(n=8, res=40)
    cfg = tiny_cfg(steps=120, resolution=40, num_init=800, max_gaussians=1500)
    scene, m = fit_splats(views, cfg)
    assert m["train_psnr"] > m["init_psnr"] + 6, m
    assert m["train_alpha_iou"] > 0.8 and m["test_alpha_iou"] > 0.8, m
    assert m["test_psnr"] > m["init_psnr"] + 4, m
    assert m["steps"] == 120 and m["num_gaussians"] == scene.num_gaussians <= 1500
    assert set(scene.params) == {"means", "quats", "scales", "opacities", "sh0", "shN"}
    assert scene.params["shN"].shape[1:] == (3, 3) and all(v.device.type == "cpu" for v in scene.params.values())
    # the fitted scene renders the sphere from a new camera: centre opaque at depth ~ 2.7 - r, corners empty
    rgba, depth = render_scene(scene, cameras.orbit_cam2world(47.0, -15.0), cameras.INTRINSICS_NORM, 40, 40)
    assert rgba.shape == (1, 40, 40, 4) and rgba.dtype == np.uint8 and depth.dtype == np.float32
    assert rgba[0, 20, 20, 3] > 200 and rgba[0, 0, 0, 3] < 30
    assert abs(depth[0, 20, 20] - (cameras.RADIUS - RADIUS)) < 0.1
    assert depth[0, 0, 0] == 0


def test_checkpoint_resume_matches_uninterrupted_run(tmp_path):
    views = sphere_views(n=6, res=24)
    cfg = tiny_cfg(checkpoint_every=10)
    full, m_full = fit_splats(views, cfg, checkpoint_dir=tmp_path / "a")
    assert m_full["resumed_from"] is None and not (tmp_path / "a" / CKPT_NAME).with_suffix(".pt.tmp").exists()

    class Crash(Exception):
        pass

    def crash_at_15(step, total, msg):
        if step == 15:
            raise Crash

    with pytest.raises(Crash):
        fit_splats(views, cfg, checkpoint_dir=tmp_path / "b", progress=crash_at_15)
    ck = torch.load(tmp_path / "b" / CKPT_NAME, weights_only=True)
    assert ck["step"] == 10
    seen = []
    resumed, m = fit_splats(views, cfg, checkpoint_dir=tmp_path / "b", progress=lambda s, t, msg: seen.append(s))
    assert m["resumed_from"] == 10 and seen[0] == 11 and seen[-1] == 20
    for k in full.params:
        torch.testing.assert_close(resumed.params[k], full.params[k], atol=1e-5, rtol=1e-4)


def test_checkpoint_of_other_settings_is_refused(tmp_path):
    views = sphere_views(n=6, res=24)
    with pytest.raises(RuntimeError):
        fit_splats(views, tiny_cfg(checkpoint_every=5), checkpoint_dir=tmp_path,
                   progress=lambda s, t, m: (_ for _ in ()).throw(RuntimeError("stop")) if s == 6 else None)
    with pytest.raises(InputError, match="other views or fit settings"):
        fit_splats(views, tiny_cfg(checkpoint_every=5, lr_sh0=1e-2), checkpoint_dir=tmp_path)
    (tmp_path / CKPT_NAME).write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="cannot be read"):
        fit_splats(views, tiny_cfg(checkpoint_every=5), checkpoint_dir=tmp_path)


def test_fit_accepts_a_views_folder_and_opaque_views(tmp_path):
    sphere_views(n=4, res=24, elev=(0.0,)).save(tmp_path / "rgba")
    views = ViewSet.load(tmp_path / "rgba")
    scene, m = fit_splats(views, tiny_cfg(steps=6, holdout_every=0))
    assert m["test_psnr"] is None and np.isfinite(m["train_psnr"])

    sphere_views(n=4, res=24, elev=(0.0,), alpha=False).save(tmp_path / "opaque")
    opaque = ViewSet.load(tmp_path / "opaque")
    assert opaque.meta.get("alpha_missing")
    scene, m = fit_splats(opaque, tiny_cfg(steps=6, holdout_every=0))
    assert np.isfinite(m["train_psnr"]) and scene.num_gaussians > 0
    scene.save(tmp_path / "scene")
    again = Scene.load(tmp_path / "scene")
    rgba, depth = render_scene(again, views.c2w[:2], views.K[:2], 16, 12, background=None)
    assert rgba.shape == (2, 12, 16, 4) and depth.shape == (2, 12, 16)


def test_init_points_are_used_and_empty_hull_is_an_input_error():
    views = sphere_views(n=4, res=24, elev=(0.0,))
    pts = np.random.default_rng(0).normal(size=(100, 3)).astype(np.float32) * 0.1
    scene, m = fit_splats(views, tiny_cfg(steps=2, holdout_every=0), init_points=pts)
    assert scene.num_gaussians == 100
    bad = ViewSet(views.images.copy(), views.c2w, views.K, views.names)
    bad.images[0, ..., 3] = 0  # one view says nothing is there
    with pytest.raises(InputError, match="visual hull"):
        fit_splats(bad, tiny_cfg(steps=2))


def test_relocation_correction_preserves_the_composited_opacity():
    from recon.fit.splat import relocation_correction

    o = torch.tensor([0.3, 0.8, 0.6])
    s = torch.tensor([[0.1] * 3, [0.2] * 3, [0.05] * 3])
    no, ns = relocation_correction(o, s, torch.tensor([1, 1, 1]))
    torch.testing.assert_close(no, o)
    torch.testing.assert_close(ns, s)
    n = torch.tensor([2, 3, 5])
    no, ns = relocation_correction(o, s, n)
    torch.testing.assert_close(1 - (1 - no) ** n.float(), o)  # n copies stacked give the old opacity
    assert (no < o).all() and (ns <= s).all() and (ns > 0.5 * s).all()


def test_outside_hull_flags_centres_the_masks_exclude():
    from recon.fit.splat import outside_hull

    data = prepare_views(sphere_views(res=32), 32)
    occ, bound = visual_hull(data["mask"], data["viewmats"], data["Ks"], grid=32)
    pts = torch.tensor([[0.0, 0.0, 0.0], [0.0, RADIUS * 0.95, 0.0], [RADIUS * 2.0, 0.0, 0.0],
                        [0.0, 0.0, -RADIUS * 2.5], [5.0, 5.0, 5.0]])
    out = outside_hull(pts, occ, bound)
    assert out.tolist() == [False, False, True, True, True]
    # the 2-voxel margin keeps a centre just outside the hull
    voxel = 2 * bound / 32
    assert not outside_hull(torch.tensor([[RADIUS + voxel, 0.0, 0.0]]), occ, bound)[0]


def test_gaussians_outside_the_visual_hull_are_relocated():
    views = sphere_views(n=6, res=24)
    rng = np.random.default_rng(1)
    inside = rng.normal(size=(250, 3)) * RADIUS * 0.4
    d = rng.normal(size=(50, 3))
    floaters = d / np.linalg.norm(d, axis=1, keepdims=True) * RADIUS * 2.2   # inside the frame, outside every mask
    pts = np.concatenate([inside, floaters]).astype(np.float32)
    cfg = tiny_cfg(steps=20, holdout_every=0)
    from recon.fit.splat import outside_hull

    data = prepare_views(views, cfg.resolution)
    hull = visual_hull(data["mask"], data["viewmats"], data["Ks"])
    assert outside_hull(torch.as_tensor(pts), *hull)[250:].all()
    scene, m = fit_splats(views, cfg, init_points=pts)
    assert m["pruned_outside"] >= 50
    assert not outside_hull(scene.params["means"], *hull).any()
    # with pruning off the floaters stay where they were put (they are relocated only if they fade)
    scene_off, m_off = fit_splats(views, tiny_cfg(steps=20, holdout_every=0, prune_outside=False), init_points=pts)
    assert m_off["pruned_outside"] == 0 and outside_hull(scene_off.params["means"], *hull).sum() > 25


def test_flatten_weight_makes_splats_flat():
    views = sphere_views(n=6, res=24)

    def ratio(scene):
        s = torch.exp(scene.params["scales"])
        return float((s.min(dim=1).values / s.max(dim=1).values).median())

    # a high scale learning rate so 30 steps can move the log-scales far
    plain, _ = fit_splats(views, tiny_cfg(steps=30, holdout_every=0, lr_scales=5e-2))
    flat, _ = fit_splats(views, tiny_cfg(steps=30, holdout_every=0, lr_scales=5e-2, flatten_weight=50.0))
    assert ratio(flat) < 0.8 * ratio(plain)


def test_render_scene_depth_modes():
    views = sphere_views(n=8, res=32)
    scene, _ = fit_splats(views, tiny_cfg(steps=60, resolution=32, num_init=600, max_gaussians=900))
    c2w, K = cameras.orbit_cam2world(20.0, 10.0), cameras.INTRINSICS_NORM
    rgba, med = render_scene(scene, c2w, K, 32, 32)                       # default: median
    _, exp = render_scene(scene, c2w, K, 32, 32, depth="expected")
    hit = (med > 0) & (exp > 0)
    assert hit[0, 16, 16] and (med[~hit] == 0).all()
    true = cameras.RADIUS - RADIUS
    # the median depth is the visible surface; expected depth is pulled back by the layers behind it
    assert abs(med[0, 16, 16] - true) < abs(exp[0, 16, 16] - true) + 1e-3
    assert np.median(exp[hit] - med[hit]) > 0
    with pytest.raises(InputError, match="depth"):
        render_scene(scene, c2w, K, 8, 8, depth="mean")
