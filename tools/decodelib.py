"""What tools/tune_decode.py and tools/benchmark_decode.py share, without their command-line flags (so that both
can be imported into one process): the decoding grid search, the per-trial timing, a random causal LM.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Sequence

import numpy as np

from b2t_jax import metrics as metrics_lib
from b2t_jax.decoding import beam_search, rescore

FIRST_PASS = ("lm_weight", "word_score", "blank_penalty")
SECOND_PASS = ("rescore_weight", "rescore_word_bonus")
GPT2_INIT_STD = 0.02  # GPT-2's initializer_range: the random model's weights are drawn like a fresh GPT-2's
GPT2_HEAD_WIDTH = 32  # width per attention head of the random model
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")


def wer(choices: Sequence[str], refs: Sequence[Sequence[str]]) -> float:
  """Aggregate WER of the chosen sentences against the reference words."""
  e = metrics_lib.ErrorRate()
  for text, ref in zip(choices, refs):
    e.add(0, text.split(), ref)
  return e.rate()


def tune(
  decoder: beam_search.LexiconLMDecoder,
  logits: Sequence[np.ndarray],
  refs: Sequence[Sequence[str]],
  grid: dict[str, Sequence[float]],
  *,
  nbest: int,
  scorer: rescore.SentenceScorer | None = None,
  gate_margin: float = 0.0,
) -> list[dict]:
  """WER at every point of `grid` (keys FIRST_PASS, and SECOND_PASS with a scorer): one row per first-pass point
  (rescore_weight None) and one per first-pass x second-pass point."""
  rows = []
  for lm_weight, word_score, blank_penalty in itertools.product(*(grid[k] for k in FIRST_PASS)):
    dec = decoder.retuned(lm_weight=lm_weight, word_score=word_score, blank_penalty=blank_penalty)
    t0 = time.perf_counter()
    nbests = [dec.decode_nbest(lg, nbest) for lg in logits]
    point = {"lm_weight": lm_weight, "word_score": word_score, "blank_penalty": blank_penalty}
    first = [nb[0].text if nb else "" for nb in nbests]
    rows.append({**point, "rescore_weight": None, "rescore_word_bonus": None, "wer": wer(first, refs)})
    print(f"{point}: wer={rows[-1]['wer']:.4f} ({time.perf_counter() - t0:.1f} s)", flush=True)
    if scorer is None:
      continue
    lp = rescore.sentence_log_probs([nb for nb in nbests if rescore.is_gated_in(nb, gate_margin)], scorer)
    for weight, bonus in itertools.product(grid["rescore_weight"], grid["rescore_word_bonus"]):
      chosen = rescore.choose(nbests, lp, weight=weight, word_bonus=bonus, gate_margin=gate_margin)
      texts = [nb[c.choice].text if nb else "" for nb, c in zip(nbests, chosen)]
      rows.append({**point, "rescore_weight": weight, "rescore_word_bonus": bonus, "wer": wer(texts, refs)})
  return rows


def best_overrides(row: dict, has_lm: bool) -> list[str]:
  """The `--config.decode.*` flags of one point."""
  out = [f"--config.decode.lm_weight={row['lm_weight']}"] if has_lm else []
  out.append(f"--config.decode.{'word_score' if has_lm else 'word_score_no_lm'}={row['word_score']}")
  out.append(f"--config.decode.blank_penalty={row['blank_penalty']}")
  if row["rescore_weight"] is not None:
    out += [
      f"--config.decode.rescore.weight={row['rescore_weight']}",
      f"--config.decode.rescore.word_bonus={row['rescore_word_bonus']}",
    ]
  return out


def write_random_causal_lm(
  path: str, words: Sequence[str], *, n_layer: int, n_embd: int, seed: int = 0, max_tokens: int = 128
) -> None:
  """A randomly initialised GPT-2 (transformers' Flax class) with a word-level tokenizer over `words`, saved as a
  HuggingFace-format directory that `CausalLMScorer` loads (weights drawn with NumPy: nothing is compiled)."""
  import jax
  from flax import traverse_util
  from tokenizers import Tokenizer, models, pre_tokenizers
  from transformers import FlaxGPT2LMHeadModel, GPT2Config, PreTrainedTokenizerFast

  vocab = {t: i for i, t in enumerate(dict.fromkeys([*SPECIAL_TOKENS, *words]))}
  tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  unk, bos, eos = SPECIAL_TOKENS
  PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=unk, bos_token=bos, eos_token=eos).save_pretrained(path)
  cfg = GPT2Config(
    vocab_size=len(vocab),
    n_positions=max_tokens,
    n_embd=n_embd,
    n_layer=n_layer,
    n_head=max(1, n_embd // GPT2_HEAD_WIDTH),
    bos_token_id=vocab[bos],
    eos_token_id=vocab[eos],
  )
  model = FlaxGPT2LMHeadModel(cfg, _do_init=False)
  abstract = jax.eval_shape(lambda key: model.init_weights(key, (1, 1)), jax.random.PRNGKey(seed))
  shapes = traverse_util.flatten_dict(abstract)
  rng = np.random.default_rng(seed)

  def draw(name: tuple, shape) -> np.ndarray:
    if name[-1] == "scale":  # layer norms start as the identity
      return np.ones(shape.shape, np.float32)
    if name[-1] == "bias":
      return np.zeros(shape.shape, np.float32)
    return rng.normal(0.0, GPT2_INIT_STD, shape.shape).astype(np.float32)

  params = traverse_util.unflatten_dict({k: draw(k, v) for k, v in shapes.items()})
  model.save_pretrained(path, params=params)


def percentiles(ms: Sequence[float]) -> dict:
  a = np.asarray(ms, np.float64)
  return {"p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99)), "mean_ms": float(a.mean())}


def time_each(fn: Callable, items: Sequence) -> list[float]:
  """Milliseconds of fn(item) for every item, one at a time."""
  out = []
  for x in items:
    t0 = time.perf_counter()
    fn(x)
    out.append(1e3 * (time.perf_counter() - t0))
  return out


def benchmark(
  decoders: dict[str, beam_search.LexiconLMDecoder],
  first_pass: str,
  logits: Sequence[np.ndarray],
  scorers: dict[str, rescore.SentenceScorer],
  nbest: int,
) -> dict[str, dict]:
  """name -> timing of: each beam ('beam, <name>'), and the first-pass beam plus each rescorer per trial."""
  out = {}
  nbests = None
  for name, dec in decoders.items():
    ms = time_each(lambda lg, dec=dec: dec.decode_nbest(lg, nbest), logits)
    out[f"beam, {name}"] = percentiles(ms)
    if name == first_pass:
      beam_ms = ms
      nbests = [dec.decode_nbest(lg, nbest) for lg in logits]
  for name, scorer in scorers.items():

    def one(nb, scorer=scorer):
      return rescore.rescore([nb], scorer, weight=1.0, word_bonus=0.0, gate_margin=0.0)

    for nb in nbests:  # warm-up: compiles every padded length the timed pass meets
      one(nb)
    ms = time_each(one, nbests)
    out[f"rescore {name}"] = percentiles(ms)
    out[f"beam, {first_pass} + rescore {name}"] = percentiles(np.add(beam_ms, ms))
  return out
