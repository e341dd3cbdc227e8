"""Base configuration: paper-scale defaults and smaller presets.

    python train.py --config configs/base.py            # 'default': paper scale, 256 x 256 sinograms
    python train.py --config configs/base.py:workstation  # the low-shot experiments: ~1 hour per stage on 2 cores
    python train.py --config configs/base.py:cpu        # a CPU run that finishes in minutes
    python train.py --config configs/base.py:smoke      # tiny shapes for tests
    python train.py --config configs/base.py --config.data.task=delayed_frame --config.data.batch_size=8

Empty strings and zeros mean "not set" where a field is optional (so every field keeps one type and can
be overridden from the command line).
"""

import ml_collections

PRESETS = ("default", "workstation", "cpu", "smoke")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    preset = arg or "default"
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {PRESETS}")

    config = ml_collections.ConfigDict()
    config.preset = preset
    config.seed = 0

    # --- data (DESIGN.md 2.2, allpet_jax/data/) ----------------------------------------------------------
    config.data = data = ml_collections.ConfigDict()
    data.task = "low_dose"  # one of allpet_jax.tasks.TASKS
    data.source = "simulated"  # 'simulated' (the embedded PET simulator) or 'files' (data.path)
    # Geometry: image_size x image_size pixels of pixel_size mm; n_angles over [0, pi); n_bins of bin_spacing mm.
    data.image_size = 256
    data.n_angles = 256
    data.n_bins = 256
    # pixel_size/bin_spacing (mm) are the physical sizes of users' files; the simulator takes only their ratio
    # and sets its pixel to the region's field of view / image_size (brain 256 mm, body 600 mm).
    data.pixel_size = 2.0  # mm
    data.bin_spacing = 2.0  # mm
    # Samples per split; the paper's low-shot regime is 500 training pairs per task.
    data.n_train = 500
    data.n_val = 50
    data.n_test = 100
    data.seed = 0  # sample i of a split is a pure function of (seed, split, i)
    # The foundation's synthesis sinograms are drawn with their own seed, so pretraining shares no sample with
    # any task's splits (drawn with data.seed): with one seed, the synthesis targets would be bit-for-bit the
    # low_dose targets. Must differ from data.seed.
    data.pretrain_seed = 1
    # simulate_pair options (allpet_jax/data/simulate.py); None = drawn per sample. More can be added in Python.
    data.simulation = ml_collections.ConfigDict({"region": None, "tracer": None, "dose": None, "counts": None})
    # Cached shards: '' simulates on the fly; a directory is filled once (cache_dir/<split>) and read after.
    data.cache_dir = ""
    data.shard_size = 64
    # Users' files (data.source = 'files'): a directory (optionally with train/val/test subfolders), glob or file.
    data.path = ""
    data.source_path = ""  # separate source files (needed for paired .npy/NIfTI data), same order
    data.format = "auto"  # 'auto' (by suffix), 'npy', 'npz', 'mat' or 'nifti'
    data.source_variable = "source"  # variable names in .npz/.mat files; '' = target-only data
    data.target_variable = "target"
    data.allow_negative = False  # True for corrected (randoms/scatter-subtracted) sinograms, which dip below 0
    # Raw physics per sample (allpet_jax/data/sources.py PHYSICS_FIELDS), for Poisson guidance and clinical OSEM:
    # prompts, normalisation, attenuation, scatter, randoms (source acquisition), target_prompts, target_scatter,
    # target_randoms; simulated (diagnostics=True), or read from files' optional .npz/.mat variables of those
    # names. Off for training: nothing extra is simulated or read.
    data.physics = False
    # Normalisation: sinogram / scale; 0 = estimate from the training split (allpet_jax/data/pipeline.py).
    data.source_scale = 0.0
    data.target_scale = 0.0
    # Pipeline.
    data.batch_size = 16
    data.num_threads = 4
    data.prefetch = 8

    if preset in ("cpu", "workstation"):
        data.image_size = data.n_angles = data.n_bins = 64
        data.pixel_size = data.bin_spacing = 8.0
        data.n_train, data.n_val, data.n_test = 64, 16, 256  # 256 test samples resolve ~0.3 dB (evaluate.py)
        data.batch_size = 8
        data.num_threads, data.prefetch = 2, 2
    if preset == "workstation":  # the paper's low-shot regime: 500 training sinograms or pairs
        data.n_train, data.n_val = 500, 32
        data.batch_size = 16
    elif preset == "smoke":
        data.image_size = data.n_angles = data.n_bins = 32
        data.pixel_size = data.bin_spacing = 16.0
        data.n_train, data.n_val, data.n_test = 16, 8, 8
        data.batch_size = 4
        data.num_threads, data.prefetch = 1, 1

    # --- masks: RMAS / DMM (DESIGN.md 2.3, allpet_jax/masks.py; fields of masks.MaskConfig) -------------
    # When enabled, the training split is wrapped in masks.RmasSource (n_train * masks_per_sinogram samples,
    # sample i = (base sinogram i // K, mask seed i % K)) and every batch gets image_mask, sino_mask, n_cells,
    # positive, negative and full (pipeline.rmas_hook). Val/test keep their length (mask seed 0).
    config.masks = masks = ml_collections.ConfigDict()
    masks.enabled = False  # set per stage by train.py: on for the foundation stage when masks.rmas
    masks.rmas = True  # foundation on RMAS/DMM views; False = plain synthesis pretraining (the ablation)
    # How the foundation uses the views (allpet_jax/training/objectives.py, one U-Net pass per record unless noted):
    # 'completion': each record is synthesis (no condition), or with probability completion_prob masked
    #   completion: generate S given one view (P = M*S or N = (1-M)*S, even odds) and its mask as conditions,
    #   so the source-condition inputs that tasks read are trained in pretraining;
    # 'triplet': the paper's full/positive/negative triplet with the P + N = S consistency term (three U-Net
    #   passes per record: match compute by giving it a third of the records or steps).
    masks.objective = "completion"
    masks.completion_prob = 0.5
    masks.device = "cpu"  # where the mask step runs ('' = JAX's default device)
    masks.grid = 8  # G: cells per side of the grid over the field of view
    masks.count = "uniform"  # k cells: 'fixed' (n_cells), 'uniform' (1..max_cells), 'poisson' (mean_cells, clipped to [1, G*G])
    masks.n_cells = 1
    masks.max_cells = 4
    masks.mean_cells = 3.0
    masks.layout = "uniform"  # 'uniform', 'clustered' (cluster_sigma_cells) or 'activity' (activity_from, activity_power)
    masks.cluster_sigma_cells = 1.0
    masks.activity_from = "fbp"  # 'fbp' of the sinogram, or the known 'image'
    masks.activity_power = 1.0
    masks.tau_mm = 0.5  # a ray is in the sinogram mask when it runs more than tau_mm through the image mask
    masks.mode = "mask"  # 'mask': P = M*S, N = (1-M)*S; 'split': P = R(m*x), N = R((1-m)*x), S := P + N (needs image)
    masks.masks_per_sinogram = 400  # K
    masks.sinogram_key = "target"  # the sinogram S that is split
    masks.image_key = "image"

    # --- tma: transparent medical attention (DESIGN.md 2.4, allpet_jax/attention.py, allpet_jax/rois.py) ---
    config.tma = tma = ml_collections.ConfigDict()
    tma.enabled = False  # the task fine-tuning stage turns it on
    tma.sinogram_key = "source"  # TMA segments the FBP of this sinogram (channel 0)
    # The image attention: 'segmented' (the parameter-free rule below) or 'oracle' (the simulator's lesion labels,
    # 1 on every lesion pixel and 0 elsewhere: the best attention could do, an upper bound for the experiments).
    tma.map = "segmented"
    tma.alpha = 1.0  # diffusion loss weight 1 + alpha * A_sino (losses.tma_latent_weight)
    tma.condition = True  # also feed A_sino to the U-Net as a condition channel
    tma.roi_file = ""  # JSON list of clinician ROIs (allpet_jax/rois.py), applied after tma.rois
    tma.rois = []  # ROI dicts, e.g. {"op": "add", "shape": "circle", "center_mm": [10, -20], "radius_mm": 15}
    # Constants of the segmentation rule (attention.TmaConfig; lengths in mm, levels as ratios).
    tma.fbp_filter = "hann"
    tma.fbp_cutoff = 1.0
    tma.body_sigma_mm = 6.0
    tma.body_threshold = 0.25
    tma.body_opening_mm = 8.0
    tma.lesion_sigma_mm = 3.5
    tma.reference_sigma_mm = 10.0
    tma.hyper_ratio = 1.5
    tma.hyper_floor = 2.0
    tma.hot_z = 2.0
    tma.cold_sigma_mm = 5.0
    tma.tissue_fraction = 0.3
    tma.edge_mm = 10.0
    tma.closing_mm = 20.0
    tma.hypo_ratio = 0.6
    tma.cold_z = 1.5
    tma.feather_mm = 1.5

    # --- model: sinogram autoencoder + latent U-Net (DESIGN.md 2.5, allpet_jax/models/) ------------------
    config.model = model = ml_collections.ConfigDict()
    model.factor = 4  # autoencoder downsampling: 4 or 8
    # z per sinogram channel. 8, measured (benchmarks/autoencoder_psnr.py): at factor 4, 4 channels lose lesion
    # contrast (0.86 of hot-lesion FBP contrast kept, 37 dB on clean sinograms at the cpu preset; 8: 0.995, 48.8 dB).
    # The cpu preset keeps 4 (below): its short task stage does better in the smaller latent.
    model.latent_channels = 8
    model.ae_channels = (64, 128, 256)  # one width per resolution level: log2(factor) + 1 of them
    model.ae_res_blocks = 1
    model.reconstruction = "l1"  # autoencoder loss: 'l1' or 'l2'
    # Also train the autoencoder on the RMAS views (P, N) the foundation encodes. Off: measured at the cpu preset
    # (benchmarks/autoencoder_psnr.py, 150 steps) it moves masked-view PSNR by +-0.1 dB and costs ~1 dB on full
    # sinograms; the views' error is the hard 0/1 mask edges, which a 4x4 patch code cannot hold. Completion only
    # conditions on a view (its target is the full sinogram), so the view's code need not decode exactly.
    model.ae_views = False
    model.kl_weight = 1e-6
    model.unet_channels = (128, 256, 256)
    model.unet_res_blocks = 2
    model.attention_levels = (1, 2)
    model.num_heads = 4
    # The pixel-space U-Net of the pixel_regressor stage (it shares unet_res_blocks and num_heads) runs on
    # the sinogram, `factor` = 4 times the latent resolution per axis. Sized for the compute of a latent
    # regressor step: log2(factor) = 2 more levels (its coarsest grid is the latent U-Net's), narrower
    # widths, attention only at the coarsest level. GFLOP per train step at batch 16 (XLA's count,
    # benchmarks/train_bench.py): 4268 here, 3731 for the latent regressor (25.5M vs 29.4M parameters);
    # (32, 64, 128, 128, 128) would be 3249, (64, 128, 256, 256) with attention at 3 is 13225.
    model.pixel_unet_channels = (32, 64, 128, 256, 256)
    model.pixel_attention_levels = (4,)

    # --- diffusion (allpet_jax/diffusion/) ---------------------------------------------------------------
    config.diffusion = diffusion = ml_collections.ConfigDict()
    diffusion.schedule = "cosine"  # 'cosine' or 'linear'
    diffusion.num_steps = 1000
    diffusion.parameterization = "v"  # "eps" or "v" (v: x0 stays well-posed at the last, pure-noise steps)
    diffusion.prompt_drop_prob = 0.1  # classifier-free guidance: prompts dropped to the null id
    diffusion.val_steps = 50  # DDIM steps for validation samples
    diffusion.clip_x0 = 5.0  # clip predicted clean latents (unit-variance scale) while sampling; 0 = off
    # Task stage objective: 'diffusion' (sampled with DDIM/DDPM) or 'bridge' (DDBM from the source latent).
    diffusion.task_objective = "diffusion"
    diffusion.bridge_sigma = 1.0
    # Task stage: diffuse the residual E(target) - E(source) instead of the target latent (objectives.PairedDiffusion).
    diffusion.residual = True
    # The diffusion task's prediction target. 'x0' makes a zero output exactly the identity (the residual is 0, so a
    # task warm-started from the foundation samples D(E(source)) at step 0: 22.4 dB vs the source's 20.5 at the cpu
    # preset), but measured there its model never learnt to read x_t: its 16 samples were identical (90% coverage
    # 0.007, the mean 1.1 dB below the pixel regressor). 'v' keeps x_t in the clean estimate (x0 = a x_t - s v), so
    # the samples spread; with the learned skip below its zero output is the identity too.
    diffusion.task_parameterization = "v"
    # The learned skip of the 'v' task (schedules.skip_offset): x0 = c_skip x_t - s v with the Wiener skip of a prior
    # variance that is a trained scalar starting at 0, so a zero output is exactly the identity (the task's step-0
    # sample is D(E(source))) and training opens the skip where reading x_t pays. The value is how many steps of
    # the learning rate move the variance from 0 to 1 (plain v); 0 turns it off.
    diffusion.task_skip_open_steps = 100
    # The task loss's min-SNR-gamma weighting (losses.min_snr_weight; 0 turns it off): a `v` loss weighs the clean
    # estimate's error by SNR + 1, and with the skip closed that error is the whole residual at every step, so the
    # first updates chase the nearly noise-free steps (validation loss 13.9 at step 0 at the workstation preset).
    diffusion.task_min_snr = 0.0
    # Foundation, decoded-prediction term weighted by alpha_bar_t (0 turns it off; its share of the loss is logged as
    # consistency_share): 'completion' supervises D(x0_hat) on the rays the condition did not show,
    # || (1 - M_view) (D(x0_hat) - S) ||^2 (all rays for synthesis records); 'triplet' is the paper's
    # || D(x0_P) + D(x0_N) - S ||^2.
    diffusion.consistency_weight = 50.0  # ~5-10% of the completion loss at the cpu preset (decoded MSE ~1e-3 vs ~0.4)

    # --- train (train.py, allpet_jax/training/) ----------------------------------------------------------
    config.train = train = ml_collections.ConfigDict()
    # Run in order, each in WORKDIR/<stage>; 'regressor' (latent) and 'pixel_regressor' (sinogram space, no
    # autoencoder) are the deterministic baselines of the evaluation.
    train.stages = "autoencoder,foundation,task,regressor,pixel_regressor"
    train.steps = {"autoencoder": 20000, "foundation": 100000, "task": 20000, "regressor": 20000,
                   "pixel_regressor": 20000}
    train.learning_rate = 1e-4
    train.warmup_steps = 1000
    train.weight_decay = 1e-4
    train.clip_norm = 1.0
    # The sinogram-space loss of the pixel regressor: 'mse', or 'ramp', the error weighted along the bins by a
    # ramp so that it counts as its image sees it (losses.ramp_mse; docs/RESULTS.md, "Why sinogram PSNR buys
    # little image PSNR").
    train.sinogram_loss = "mse"
    train.ema_decay = 0.999
    # The EMA's decay warms up as min(ema_decay, (1 + step) / (10 + step)) (training.step.ema_decay_at): without
    # it, 5 % of the initial parameters stay in the EMA after 3000 steps at 0.999. Runs saved before it
    # existed trained without (False).
    train.ema_warmup = True
    train.memory_budget_gb = 0.0  # > 0: pick the largest micro-batch whose compiled step fits (per device)
    train.n_devices = 0  # 0: every local device
    train.log_every = 100
    train.eval_every = 2000
    train.checkpoint_every = 2000
    train.keep_checkpoints = 3
    train.foundation_dir = ""  # task stage: foundation checkpoint dir ('' = WORKDIR/foundation)
    train.autoencoder_dir = ""  # diffusion stages: autoencoder checkpoint dir ('' = WORKDIR/autoencoder)

    if preset == "cpu":
        model.ae_channels = (16, 32, 32)
        # 4 latent channels here, by measurement of the task (docs/RESULTS.md, the model issue): at this preset's 800
        # task steps, 8 channels (48.8 dB clean, 0.99 lesion contrast) left the diffusion undertrained (mean of 16
        # 22.5 dB, 2.5 dB below the pixel regressor) while 4 (37.0 dB, 0.86 contrast) gave 25.4 dB, +0.42 over it,
        # with 0.92 coverage. --config.model.latent_channels=8 keeps lesions at the cost of a longer task stage.
        model.latent_channels = 4
        model.unet_channels = (32, 64)
        model.unet_res_blocks = 1
        model.attention_levels = (1,)
        # GFLOP per train step at batch 8: 4.46 here, 4.5 for the latent regressor (287k vs 781k parameters);
        # (16, 32, 64) with attention at 2 would be 19.5, (8, 16, 32) 5.46, (8, 16, 32, 64) 5.92.
        model.pixel_unet_channels = (8, 16, 32, 32)
        model.pixel_attention_levels = (3,)
        diffusion.val_steps = 20
        # The autoencoder starts from its patch PCA and levels off within ~100 steps; the task stage is
        # the cheap one (no triplets, no decoder in the loss), so it gets the most steps.
        train.steps = {"autoencoder": 150, "foundation": 300, "task": 800, "regressor": 800,
                       "pixel_regressor": 800}
        train.learning_rate = 5e-4
        train.warmup_steps = 50
        train.ema_decay = 0.99
        train.log_every = 25
        train.eval_every = 50
        train.checkpoint_every = 100
    elif preset == "workstation":
        # Sized by measurement (docs/RESULTS.md, "The workstation preset"), 1 process on 2 cores, batch 16
        # (benchmarks/train_bench.py): foundation 45 GFLOP/step, 15.6 samples/s; task 36, 25 samples/s; the
        # pixel regressor's widths match the latent regressor's 36 GFLOP (37). Each stage's steps fit in about an
        # hour on 2 cores; whether it plateaus there, its learning curve says (docs/WORKSTATION.md).
        model.ae_channels = (16, 32, 32)
        model.latent_channels = 8  # keeps hot-lesion contrast (0.995 vs 0.86 with 4)
        model.unet_channels = (64, 128)
        model.unet_res_blocks = 2
        model.attention_levels = (1,)
        model.pixel_unet_channels = (12, 24, 48, 96)
        model.pixel_attention_levels = (3,)
        diffusion.val_steps = 20
        train.steps = {"autoencoder": 600, "foundation": 3000, "task": 3000, "regressor": 3000,
                       "pixel_regressor": 3000}
        train.learning_rate = 3e-4
        train.warmup_steps = 100
        train.ema_decay = 0.999
        # The plan's arms (allpet_jax.workstation) compare with each other, and its first ones trained before the
        # EMA warm-up existed, so this preset keeps the EMA without it; ds500_ema, and new work, turn it on.
        train.ema_warmup = False
        train.log_every = 50
        train.eval_every = 250
        train.checkpoint_every = 250
    elif preset == "smoke":
        model.ae_channels = (8, 16, 16)
        model.latent_channels = 4  # tiny shapes for tests, not quality
        model.unet_channels = (16, 32)
        model.unet_res_blocks = 1
        model.attention_levels = (1,)
        model.num_heads = 2
        model.pixel_unet_channels = (8, 16)
        model.pixel_attention_levels = (1,)
        diffusion.num_steps = 100
        diffusion.val_steps = 4
        train.steps = {"autoencoder": 6, "foundation": 4, "task": 4, "regressor": 4, "pixel_regressor": 4}
        train.learning_rate = 1e-3
        train.warmup_steps = 2
        train.ema_decay = 0.5
        train.log_every = 2
        train.eval_every = 3
        train.checkpoint_every = 3

    return config
