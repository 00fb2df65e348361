"""Reference hyper-parameters of SPEC §4 (the NEJM GRU baseline); other configs start from this one.

Launch: python -m b2t_jax.main --config=configs/default.py --workdir=DIR --config.data.data_dir=.../hdf5_data_final
"""

import ml_collections

from b2t_jax.data.t15 import T15_SESSIONS
from b2t_jax.models import mamba2, transformer


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.mode = "train"  # train | eval | infer | calibrate | summary
  c.seed = 10  # model init / dropout / augmentation PRNG seed
  c.mesh_shape = (-1, 1)  # (data, model) device mesh; -1 takes all remaining devices
  # Logical axis -> mesh axis (MaxText style). The NoiseModel's 7168-wide GRU kernels are split over 'model'
  # along their hidden axis; the 768-wide GRUs, day layers and heads stay replicated.
  c.logical_axis_rules = (
    ("noise_hidden", "model"),
    ("hidden", None),
    ("gru_in", None),
    # day layers, patch projection and heads: named, replicated
    ("days", None),
    ("features", None),
    ("features_out", None),
    ("patch_features", None),
    ("classes", None),
    ("ictc_width", None),  # intermediate CTC heads (model.intermediate_ctc)
    # transformer stacks (model.encoder='transformer'): input, residual, heads, head width, MLP, output widths
    ("tfm_in", None),
    ("tfm_embed", None),
    ("tfm_heads", None),
    ("tfm_kv", None),
    ("tfm_mlp", None),
    ("tfm_out", None),
    # Mamba-2 stacks (model.encoder='mamba2'): input, residual, inner, heads, B/C groups, state, conv, output
    ("ssm_in", None),
    ("ssm_embed", None),
    ("ssm_inner", None),
    ("ssm_heads", None),
    ("ssm_groups", None),
    ("ssm_state", None),
    ("ssm_conv", None),
    ("ssm_out", None),
    ("members", None),  # ensemble member axis (train.n_models > 1); ("members", "model") first in this list puts
    # each member on its own 'model' slice (rules listed earlier win a mesh axis)
  )
  c.fsdp = False  # also split params and optimizer moments over 'data' (all-gathered for use, grads reduce-scattered)
  c.fsdp_min_size = 2**16  # fsdp: arrays with fewer elements stay replicated (their all-gather costs more than they do)
  c.distributed = False  # call jax.distributed.initialize() (multi-host pods, multi-process CPU)
  c.coordinator_address = ""  # host:port of process 0; "" = auto-detect (Cloud TPU, SLURM)
  c.num_processes = 0  # with coordinator_address: total processes
  c.process_id = -1  # with coordinator_address: this process's index
  c.cpu_collectives = "gloo"  # cross-process collectives of the CPU backend (ignored on TPU/GPU)
  c.reference_yaml = ""  # the reference rnn_args.yaml this config was built from (configs/reference_yaml.py); "" = none

  c.data = d = ml_collections.ConfigDict()
  d.data_dir = ""  # prepared TFDS dir (tools/prepare_data.py, local or gs://) or an hdf5_data_final root
  # (prepared on first use into cache_dir); "" = synthetic data in WORKDIR
  d.cache_dir = ""  # where HDF5 trees get prepared, keyed by their contents; "" = ~/.cache/b2t_jax/tfds
  d.prefetch = 4  # host batches prepared ahead in the background (0 = on the training thread)
  d.prefetch_workers = 2  # threads decoding and padding host batches in parallel (per Grain worker process)
  d.loader = "threads"  # threads (the prefetcher of data/batching.py) | grain (data/grain_loader.py): same batches
  d.grain_workers = 2  # loader=grain: worker processes building batches (0 = threads of the training process)
  d.sessions = T15_SESSIONS  # session list: position = day index
  d.n_features = 512  # features per 20 ms bin in the files
  d.feature_pool = 1  # opt-in: average groups of this many adjacent columns (1 = off). Assumes neighbouring
  # columns share a signal, which no real array gives: a speed knob, not a recipe
  d.batch_size = 64  # global trials per optimizer step
  d.days_per_batch = 4  # distinct days per training batch, trials sampled with replacement within a day
  d.seed = 1  # batch-sampler seed (batch k depends only on (seed, k))
  d.length_aware = False  # opt-in: trials of similar length per batch (less padding; measured worse PER: README)
  d.length_window = 0.1  # length_aware: fraction of each day's trials, nearest the batch's anchor length, drawn from
  d.eval_batch_size = 64  # trials per validation batch (padded with masked rows)
  d.time_buckets = (256, 512, 768, 1024, 1536, 2048, 3072)  # padded lengths in bins (one compile each)
  d.max_label_len = 128  # phoneme label padding; longer labels are an error naming the trial
  d.on_bad_trial = "error"  # error | skip (counted per reason, WORKDIR/skipped_trials.json): malformed trials
  d.synthetic = s = ml_collections.ConfigDict()  # used only when data_dir == ""
  s.seed = 0  # generator seed
  s.n_sessions = 8  # first N sessions of the list get a folder
  s.trials_per_session = 60  # train trials per session (val and test get a quarter each)
  s.noise_std = 1.0  # per-bin Gaussian noise on every channel
  s.length_profile = "demo"  # trial lengths: demo (1.5-4 s, fast) | t15 (~2-30 s, like the release)

  c.aug = a = ml_collections.ConfigDict()
  a.static_gain_std = 0.0  # std of a per-trial channel-mixing perturbation (0 = off)
  a.white_noise_std = 1.0  # per-bin, per-channel Gaussian noise
  a.constant_offset_std = 0.2  # per-trial, per-channel offset
  a.random_walk_std = 0.0  # per-bin random-walk step std (0 = off)
  a.random_cut = 3  # drop the first c ~ U{0..random_cut-1} bins (one c per batch)
  a.smooth_kernel_std = 2.0  # Gaussian smoothing sigma in bins (train and eval)
  a.smooth_kernel_size = 100  # support of the sampled Gaussian before thresholding
  a.smooth_threshold = 0.01  # taps at or below this are dropped, the rest renormalised
  # Time-domain augmentations (not in SPEC; opt-in, train only; data/augment.py). Jitter runs first, on the raw bins;
  # masking runs last, after smoothing, so that masked bins are exact zeros.
  a.time_jitter_shift_bins = 0  # per-trial shift by U{-N..N} bins (delay: leading zeros; advance: drops bins); 0 = off
  a.time_jitter_stretch = 0.0  # per-trial time stretch by a factor U[1-s, 1+s] (lengths follow); 0 = off
  a.time_mask_fraction = 0.0  # expected fraction of each trial's bins zeroed in spans (Feghhi et al.: > 0.5); 0 = off
  a.time_mask_max_bins = 20  # time masking: spans are U{1..N} bins long

  c.model = m = ml_collections.ConfigDict()
  m.kind = "gru"  # gru (NEJM baseline) | triple (noise/clean/noisy)
  m.dtype = "float32"  # compute dtype of matmul inputs; params, GRU carry and CTC stay fp32
  m.n_classes = 41  # blank + 39 phonemes + word boundary
  m.patch_size = 14  # bins per patch
  m.patch_stride = 4  # bins between patch starts
  m.patch_features = 0  # 0 = patch the day layer's n_features outputs (SPEC); F = learned Dense(-> F) first
  m.input_dropout = 0.2  # dropout after the day layer (training only)
  m.rnn_dropout = 0.4  # dropout between GRU layers
  m.hidden = 768  # GRU width (baseline; clean and noisy decoders of the triple)
  m.n_layers = 5  # GRU layers of the baseline
  m.noise_layers = 2  # triple: NoiseModel GRU layers (width = patch_size * features)
  m.clean_layers = 3  # triple: CleanSpeechModel GRU layers
  m.noisy_layers = 2  # triple: NoisySpeechModel GRU layers
  m.grl_lambda = 0.5  # triple: gradient-reversal strength after warm-up
  m.gru_unroll = 1  # time steps unrolled per scan iteration
  m.gru_backward = "custom"  # custom (weight gradients as one matmul after the reverse scan) | autodiff
  m.gru_remat = False  # recompute each GRU layer's forward in the backward (measured: no saving with custom)
  m.gru_wavefront = False  # all GRU layers in one scan of P+L-1 steps (latency-bound accelerators; slower on CPU)
  # The sequence stacks (models/encoders.py): gru (SPEC) | transformer | mamba2. Depths are n_layers (kind gru) and
  # noise/clean/noisy_layers (triple) for every kind; `hidden` is the GRU width; the other kinds' widths are below.
  m.encoder = "gru"
  m.transformer = transformer.default_config()  # encoder='transformer': one comment per knob in models/transformer.py
  m.mamba2 = mamba2.default_config()  # encoder='mamba2': one comment per knob in models/mamba2.py
  m.intermediate_ctc = ()  # layer indices of the speech stack followed by a self-conditioned CTC head; () = off
  # What the speech head predicts (b2t_jax/diphones.py): phoneme (SPEC) | diphone (CTC over 1 + 40*40 (previous,
  # current) pairs, decoded as their phoneme marginals; loss.marginal_ctc_weight) | both (diphone + a phoneme head,
  # loss.phoneme_ctc_weight)
  m.targets = "phoneme"
  # diphone/both: factored (phoneme logit + a zero-initialised (prev, cur) term: starts as a phoneme head) | flat
  m.diphone_head = "factored"

  c.loss = l = ml_collections.ConfigDict()
  l.noisy_weight = 0.2  # triple: weight of the adversarial CTC term
  l.noise_l2_weight = 0.0  # triple: weight of mean(noise^2)
  l.adversarial_warmup_steps = 0  # triple: GRL lambda ramps linearly from 0 over this many steps
  l.intermediate_ctc_weight = 0.3  # model.intermediate_ctc: loss + w * mean CTC of the intermediate heads
  l.phoneme_ctc_weight = 0.3  # model.targets='both': loss + w * CTC of the auxiliary phoneme head (not tuned)
  # model.targets diphone/both: loss + w * CTC of the diphone head's phoneme marginals (DCoND's joint objective);
  # 0 = the diphone CTC alone. 3.0 from demo runs (README, "Diphone targets": 600 steps, PER 0.605 at 1.0, 0.493 at 3)
  l.marginal_ctc_weight = 3.0

  c.optim = o = ml_collections.ConfigDict()
  o.lr_peak = 0.005  # peak learning rate
  o.lr_min = 1e-4  # learning rate at the end of the cosine
  o.warmup_steps = 1000  # linear warm-up from 0
  o.decay_steps = 120_000  # step at which the cosine reaches lr_min (includes warm-up)
  o.day_lr_peak = 0.005  # day layers: peak learning rate
  o.day_lr_min = 1e-4  # day layers: final learning rate
  o.day_warmup_steps = 1000  # day layers: warm-up steps
  o.b1 = 0.9  # Adam beta1
  o.b2 = 0.999  # Adam beta2
  o.eps = 0.1  # Adam epsilon (large on purpose, as in the reference)
  o.weight_decay = 0.001  # AdamW decay on GRU/Dense kernels and h0 only
  o.grad_clip_norm = 10.0  # global-norm clipping (0 = off)
  o.grad_accum_steps = 1  # micro-batches per optimizer step (inside the jitted step)

  c.stream = st = ml_collections.ConfigDict()  # b2t_jax.decoding.streaming
  st.chunk_bins = 4  # 20 ms bins per streaming step (80 ms); a multiple of model.patch_stride

  c.train = t = ml_collections.ConfigDict()
  t.num_steps = 120_000  # optimizer steps
  t.n_models = 1  # ensemble members trained together in one step (seeds seed..seed+K-1; merged by mean log-probs)
  t.eval_every = 2000  # validate after step 0 and every N steps, and after the last
  t.log_every = 100  # write train metrics every N steps
  t.checkpoint_every = 2000  # save the resumable 'latest' checkpoint every N steps
  t.max_checkpoints = 2  # 'latest' checkpoints kept
  t.max_nonfinite_steps = 10  # stop with an error after this many consecutive skipped non-finite steps
  t.preempt_exit_code = 75  # exit status after saving on SIGTERM (EX_TEMPFAIL): a scheduler restarts on it
  t.lock_heartbeat_s = 30.0  # seconds between refreshes of WORKDIR/lock
  t.lock_stale_s = 600.0  # a lock not refreshed for this long is taken over (its run is dead)
  t.profile_steps = 0  # trace this many steps (after the run's first 2, which compile) into WORKDIR/plugins/profile
  t.profile_python = False  # also trace Python calls (XLA's Python tracer: can segfault on Python 3.11, see train.py)

  c.eval = ev = ml_collections.ConfigDict()
  ev.out_dir = ""  # mode=eval writes metrics.json and skipped_trials.json here; "" = WORKDIR/eval

  # Word decoding (b2t_jax/decoding/): flashlight-text LexiconDecoder over a phoneme trie of the lexicon (CMUdict,
  # lexicon_path, pronunciations learned from the labelled training trials), then optional n-best rescoring.
  # Emissions are natural-log CTC posteriors, KenLM scores are log10: a hypothesis scores
  # Σ log p(frame) + lm_weight·log10 P_LM + word_score·#words + sil_score·#silence frames. The reference's
  # WFST decoder (acoustic scale 0.325 on natural-log LM costs) corresponds roughly to lm_weight ≈ ln(10)/0.325 ≈ 7.
  c.decode = dc = ml_collections.ConfigDict()
  dc.lm_path = ""  # word n-gram LM (ARPA from tools/build_lm.py, or KenLM binary); "" = no LM
  dc.vocabulary = "auto"  # auto (= lm if lm_path else train) | lm | train | cmudict | FILE: the decoder's words
  dc.lexicon_path = ""  # extra/overriding pronunciations, lines 'word PH PH ...' (CMUdict style)
  dc.lexicon_variants = True  # also spell CMUdict's words as the training labels do (after CMUdict's spellings)
  dc.nbest = 1  # distinct word sequences kept per trial from the beam (trials.jsonl 'nbest'); >= 2 to rescore
  dc.beam_size = 100  # hypotheses kept per frame
  dc.beam_size_token = 41  # classes tried per frame (41 = all)
  dc.beam_threshold = 25.0  # drop hypotheses scoring this far below the best
  dc.lm_weight = 2.0  # weight of the log10 LM score (ignored without lm_path)
  dc.word_score = 0.0  # added per emitted word with the LM (>0 offsets the LM's per-word cost)
  dc.word_score_no_lm = 0.0  # added per emitted word in lexicon-only decoding (no LM cost to offset)
  dc.sil_score = 0.0  # added per word-boundary/silence frame
  dc.unk_score = float("-inf")  # score of an out-of-lexicon word; -inf = never emit one
  dc.log_add = False  # merge equal hypotheses by log-add (True) or max (Viterbi)
  dc.blank_penalty = 0.0  # subtracted from the blank's log-probability (the reference used log(90) ≈ 4.5)
  # Second pass (b2t_jax/decoding/rescore.py): hypothesis h scores total(h) + weight·ln P(h) + word_bonus·#words.
  dc.rescore = rs = ml_collections.ConfigDict()
  rs.kind = "none"  # none | ngram (ARPA or KenLM binary) | causal_lm (local HuggingFace directory, JAX) | callable
  rs.path = ""  # ngram: the LM file; causal_lm: the model directory; callable: 'module:function'
  rs.weight = 1.0  # weight of the rescoring LM's natural-log sentence probability
  rs.word_bonus = 0.0  # added per word of a rescored hypothesis
  rs.gate_margin = 0.0  # > 0: rescore only trials whose first-pass best-minus-second total is below it; 0 = all
  rs.batch_size = 16  # causal_lm: sentences per forward pass (padded to a power of two in tokens)

  # mode=calibrate (b2t_jax/calibrate.py): fit day layers for new sessions on a trained workdir's network.
  c.calibrate = cal = ml_collections.ConfigDict()
  cal.data_dir = ""  # hdf5_data_final-style tree of the new session(s): data_train.hdf5 (fit), data_val.hdf5 (PER)
  cal.out_dir = ""  # the calibrated workdir to write (config.py, config.json, checkpoints); must be new or empty
  cal.n_sentences = 20  # labelled sentences per session used: the first N trials of its data_train.hdf5
  cal.holdout_fraction = (
    0.2  # share of those N held out for early stopping (0 = fit on all, steps_without_holdout steps)
  )
  cal.init = "last"  # last (most recent trained day's layer) | mean (of the trained days' layers) | identity
  cal.fit_all = False  # also fit every other parameter, at lr_rest (False: only the new day layers change)
  cal.lr = 0.005  # day-layer Adam learning rate (constant)
  cal.lr_rest = 1e-4  # with fit_all: AdamW learning rate of the rest of the network
  cal.batch_size = 16  # trials per calibration step (drawn with replacement from the fitting sentences)
  cal.max_steps = 200  # upper bound on calibration steps
  cal.eval_every = 10  # steps between held-out evaluations (early stopping)
  cal.patience = 4  # stop after this many held-out evaluations without a lower CTC loss
  cal.steps_without_holdout = 10  # steps when no sentence can be held out (N = 1 or holdout_fraction = 0)
  cal.seed = 0  # calibration batch, dropout and augmentation seed
  cal.curve = ""  # e.g. "1,5,10,20,40": also calibrate with each N, write calibration.csv and calibration.png

  # mode=infer (b2t_jax/infer.py): run a split through the best (else latest) checkpoint and decode it.
  c.infer = inf = ml_collections.ConfigDict()
  inf.split = "val"  # val (with PER/WER) | test (competition CSV) | train
  inf.out_dir = ""  # "" = WORKDIR/infer_<split>
  inf.checkpoint = "best"  # best | latest: which checkpoint manager to restore from (falls back to latest)
  inf.save_logits = False  # also write logits.npz: (T, 41) logits (an ensemble's merged log-probs; diphone targets'
  # marginal log-probs) per trial
  inf.plot = True  # write per_day.png (per-day PER and WER)
  inf.member = -1  # k >= 0: decode only member k of an ensemble workdir (train.n_models > 1); -1 = all, merged
  inf.ensemble_workdirs = ""  # DIR,DIR: also merge these workdirs' members (same patching, classes, sessions)
  return c
