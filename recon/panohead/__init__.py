"""PanoHead (CVPR'23 tri-grid 3D GAN) in plain PyTorch: a restricted loader for the
official snapshot pickles, the generator, checkpoint conversion, camera-condition
rings and GAN inversion (DESIGN §7). Submodules import torch; nothing loads weights
at import time.

    safe_pickle   load_network_snapshot(pkl) -> Snapshot (G_ema state dict + kwargs), nothing executed
    generator     PanoHeadConfig, PanoHeadGenerator (mapping / apply_delta_c / synthesis / forward)
    convert       convert_checkpoint(src, out) ; load_generator(folder, device, dtype)
    rings         render_condition_ring(G, num_views, pitches, seed=0, truncation=0.7, cache_dir=...)
    invert        invert(G, image, label, ...) -> InversionResult ; coarse_geometry(G, ws, resolution)
    perceptual    PerceptualLoss (LPIPS-VGG layout), load_perceptual_weights(net, vgg, lin)
"""
