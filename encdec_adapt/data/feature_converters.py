"""Feature converters: task features -> model batches, with explicit, counted length handling.

Every converter first applies a length policy to the task features, then pads / packs:
- "truncate": cut over-long features to their length (counts `truncated/F` examples and
  `truncated_tokens/F` tokens);
- "drop": drop examples with any over-long feature (counts `dropped/F` per offending feature and
  `dropped_examples`).
Nothing is cut silently: read the counts with `counters.COUNTERS.result()` (or pass a `Counters`).
Call tasks with `trim_output_features=False` (as `registry.get_dataset` does), otherwise seqio trims
before the converter can count.

Converters and the batches they give (int32, [B, L]; t5x / seqio names):
- `EncDecConverter`: encoder_input_tokens, decoder_input_tokens, decoder_target_tokens,
  decoder_loss_weights; packed: encoder_/decoder_segment_ids and _positions (seqio packing:
  segment ids 1, 2, ... per packed example, 0 on padding; positions restart at 0 per segment).
  With `teacher=True` (PrefixLM + KD tasks that keep `full` / `split`): also teacher_input_tokens,
  teacher_target_tokens, teacher_loss_weights [B, inputs + targets] for the decoder-only teacher,
  where teacher_target_tokens[b, split + j] == decoder_target_tokens[b, j].
- `DecoderOnlyConverter`: decoder_input_tokens, decoder_target_tokens, decoder_loss_weights
  (+ decoder_causal_attention when the task has `inputs`: PrefixLM); packed: decoder_segment_ids,
  decoder_positions.
- `DualEncoderConverter`: query_tokens [B, Lq], positive_tokens [B, Lp] and, when the task has
  hard negatives, negative_tokens [B, N, Lp]; never packed.
- `ClassificationConverter`: encoder_input_tokens [B, L] and labels [B]; never packed.
"""

from __future__ import annotations

from collections.abc import Mapping

import seqio
import tensorflow as tf

from encdec_adapt.data import counters as counters_lib
from encdec_adapt.data import text, vocab
from encdec_adapt.errors import ConfigError

POLICIES = ("truncate", "drop")


def apply_length_policy(
    ds: tf.data.Dataset,
    lengths: Mapping[str, int],
    policy: str = "truncate",
    counters: counters_lib.Counters | None = None,
) -> tf.data.Dataset:
    """Truncates or drops features longer than `lengths` (last axis), counting what was cut."""
    if policy not in POLICIES:
        raise ConfigError(f"length policy must be one of {POLICIES}, got {policy!r}")
    counters = counters or counters_lib.COUNTERS
    names = sorted(lengths)

    def excess(x, length):
        """Tokens over `length` in x ([L] or ragged [N, L]: summed over rows)."""
        sizes = x.row_lengths() if isinstance(x, tf.RaggedTensor) else tf.shape(x)[-1:]
        return tf.reduce_sum(tf.maximum(tf.cast(sizes, tf.int64) - length, 0))

    def check(ex):
        ex = dict(ex)
        too_long = tf.constant(False)
        for name in names:
            if name not in ex:
                continue
            cut = excess(ex[name], lengths[name])
            over = cut > 0
            too_long |= over
            if policy == "truncate":
                counters.add(f"truncated/{name}", tf.cast(over, tf.int64))
                counters.add(f"truncated_tokens/{name}", cut)
                ex[name] = ex[name][..., : lengths[name]]
            else:
                counters.add(f"dropped/{name}", tf.cast(over, tf.int64))
        if policy == "truncate":
            return ex, tf.constant(True)
        counters.add("dropped_examples", tf.cast(too_long, tf.int64))
        return ex, ~too_long

    return text.keep_flagged(ds.map(check, num_parallel_calls=tf.data.AUTOTUNE))


class EncDecConverter(seqio.EncDecFeatureConverter):
    """seqio's encoder-decoder converter behind a counted length policy (+ optional KD teacher)."""

    def __init__(
        self,
        pack: bool = True,
        length_policy: str = "truncate",
        counters: counters_lib.Counters | None = None,
        teacher: bool = False,
        teacher_bos_id: int = 2,
        **kwargs,
    ):
        if teacher and pack:
            raise ConfigError("EncDecConverter(teacher=True) needs pack=False (one example a row)")
        if teacher:
            spec = seqio.FeatureConverter.FeatureSpec(dtype=tf.int32)
            kwargs["passthrough_features"] = {k: spec for k in TEACHER_FEATURES}
        super().__init__(pack=pack, **kwargs)
        self.length_policy, self.counters = length_policy, counters
        self.teacher, self.teacher_bos_id = teacher, teacher_bos_id

    def __call__(self, ds: tf.data.Dataset, task_feature_lengths: Mapping[str, int]):
        lengths = {k: task_feature_lengths[k] for k in ("inputs", "targets")}
        if self.teacher:
            missing = {"full", "split"} - set(ds.element_spec)
            if missing:
                raise ConfigError(
                    f"EncDecConverter(teacher=True) needs the PrefixLM full-sequence features "
                    f"{sorted(missing)} (prefix_lm(full_sequence=True)); the task gives "
                    f"{sorted(ds.element_spec)}"
                )
            ds = ds.map(self._teacher_features, num_parallel_calls=tf.data.AUTOTUNE)
            lengths.update({k: lengths["inputs"] + lengths["targets"] for k in TEACHER_FEATURES})
        ds = apply_length_policy(_select(ds, lengths), lengths, self.length_policy, self.counters)
        return super().__call__(ds, lengths)

    def _teacher_features(self, ex):
        """The decoder-only view of a PrefixLM example: [bos] + full -> full + [eos]."""
        full = ex["full"]
        target = tf.concat([full, tf.constant([vocab.EOS_ID], full.dtype)], 0)
        steps = tf.range(tf.size(target))
        return {
            "inputs": ex["inputs"],
            "targets": ex["targets"],
            "teacher_input_tokens": tf.concat([[self.teacher_bos_id], full], 0),
            "teacher_target_tokens": target,
            # Loss (and distillation) on the targets' positions only, as for the student.
            "teacher_loss_weights": tf.cast(steps >= tf.cast(ex["split"], tf.int32), tf.int32),
        }


def _select(ds: tf.data.Dataset, names) -> tf.data.Dataset:
    """Only the features a converter uses (seqio would drop the rest with a warning per call)."""
    missing = set(names) - set(ds.element_spec)
    if missing:
        raise ConfigError(f"the task gives {sorted(ds.element_spec)}, not {sorted(missing)}")
    return ds.map(lambda ex: {k: ex[k] for k in names}, num_parallel_calls=tf.data.AUTOTUNE)


TEACHER_FEATURES = ("teacher_input_tokens", "teacher_target_tokens", "teacher_loss_weights")


class DecoderOnlyConverter(seqio.DecoderFeatureConverter):
    """seqio's decoder-only (LM, or PrefixLM when the task has `inputs`) converter, counted."""

    def __init__(
        self,
        pack: bool = True,
        length_policy: str = "truncate",
        counters: counters_lib.Counters | None = None,
        **kwargs,
    ):
        super().__init__(pack=pack, **kwargs)
        self.length_policy, self.counters = length_policy, counters

    def __call__(self, ds: tf.data.Dataset, task_feature_lengths: Mapping[str, int]):
        lengths = task_feature_lengths
        ds = apply_length_policy(_select(ds, lengths), lengths, self.length_policy, self.counters)
        return super().__call__(ds, lengths)


class DualEncoderConverter:
    """(query, positive[, negatives]) -> padded query_tokens, positive_tokens[, negative_tokens].

    task_feature_lengths: {"query": Lq, "positive": Lp} (+ "negatives": Lp); negatives are
    truncated / dropped per row like the other features.
    """

    pack = False

    def __init__(
        self, length_policy: str = "truncate", counters: counters_lib.Counters | None = None
    ):
        self.length_policy, self.counters = length_policy, counters

    def __call__(self, ds: tf.data.Dataset, task_feature_lengths: Mapping[str, int]):
        for name in ("query", "positive"):
            if name not in task_feature_lengths:
                raise ConfigError(
                    f"DualEncoderConverter needs task_feature_lengths[{name!r}]; "
                    f"got {dict(task_feature_lengths)}"
                )
        has_negatives = "negatives" in ds.element_spec
        lengths = dict(task_feature_lengths)
        if has_negatives:
            lengths.setdefault("negatives", lengths["positive"])
        else:
            lengths.pop("negatives", None)
        ds = apply_length_policy(ds, lengths, self.length_policy, self.counters)

        def convert(ex):
            pad = lambda x, n: tf.pad(x, [[0, n - tf.size(x)]])
            out = {
                "query_tokens": tf.ensure_shape(pad(ex["query"], lengths["query"]), [None]),
                "positive_tokens": pad(ex["positive"], lengths["positive"]),
            }
            out["query_tokens"].set_shape([lengths["query"]])
            out["positive_tokens"].set_shape([lengths["positive"]])
            if has_negatives:
                neg = ex["negatives"]
                out["negative_tokens"] = neg.to_tensor(shape=[neg.nrows(), lengths["negatives"]])
            return out

        return ds.map(convert, num_parallel_calls=tf.data.AUTOTUNE)

    def get_model_feature_lengths(self, task_feature_lengths: Mapping[str, int]):
        out = {
            "query_tokens": task_feature_lengths["query"],
            "positive_tokens": task_feature_lengths["positive"],
        }
        if "negatives" in task_feature_lengths:
            out["negative_tokens"] = task_feature_lengths["negatives"]
        return out


class ClassificationConverter:
    """(inputs, label) -> encoder_input_tokens [L] padded with 0, labels [] int32; never packed.

    task_feature_lengths: {"inputs": L}; over-long inputs follow the length policy (counted).
    """

    pack = False

    def __init__(
        self, length_policy: str = "truncate", counters: counters_lib.Counters | None = None
    ):
        self.length_policy, self.counters = length_policy, counters

    def __call__(self, ds: tf.data.Dataset, task_feature_lengths: Mapping[str, int]):
        if "inputs" not in task_feature_lengths:
            raise ConfigError(
                f"ClassificationConverter needs task_feature_lengths['inputs']; "
                f"got {dict(task_feature_lengths)}"
            )
        missing = {"inputs", "label"} - set(ds.element_spec)
        if missing:
            raise ConfigError(
                f"ClassificationConverter needs the task features 'inputs' and 'label'; the task "
                f"gives {sorted(ds.element_spec)}"
            )
        length = task_feature_lengths["inputs"]
        ds = ds.map(lambda ex: {"inputs": ex["inputs"], "label": ex["label"]})
        ds = apply_length_policy(ds, {"inputs": length}, self.length_policy, self.counters)

        def convert(ex):
            tokens = tf.pad(ex["inputs"], [[0, length - tf.size(ex["inputs"])]])
            tokens.set_shape([length])
            return {"encoder_input_tokens": tokens, "labels": tf.cast(ex["label"], tf.int32)}

        return ds.map(convert, num_parallel_calls=tf.data.AUTOTUNE)

    def get_model_feature_lengths(self, task_feature_lengths: Mapping[str, int]):
        return {"encoder_input_tokens": task_feature_lengths["inputs"], "labels": 1}
