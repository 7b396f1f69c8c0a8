"""Reference pass: score every tokenized example once with the frozen reference model, into Parquet shards.

Training then reads these log-probs and never loads the reference model (TRL's ``precompute_ref_log_probs``,
done as a separate DeepSpeed job).

    dpo-pipeline reference --config cfg.yaml                                  # 1 process
    dpo-pipeline reference --config cfg.yaml num_processes=2 deepspeed=configs/ds_zero3.json

Features:

* **DeepSpeed inference engine, no optimizer.** ``reference_zero_stage: auto`` runs stage 0 (replicated
  weights, no gathers) when the model takes at most half of one device, else ZeRO-3, loaded already
  partitioned through ``HfDeepSpeedConfig``, so a model larger than one device is sharded across the ranks.
  (ZeRO-1/2 shard only optimizer state and gradients, which a forward-only pass does not have.) 1 or N
  processes under any launcher; gloo on CPU, nccl on GPU. ``eval()`` and ``no_grad``.
* **One log-prob function.** :func:`pipeline.logprobs.completion_logps`, the very function training calls for
  the policy: completion tokens only, float32 accumulation whatever the model dtype, no full
  [batch, seq, vocab] float32 log-softmax. Model dtype bf16 when ``bf16`` is set, else fp32. In training's
  layout (:mod:`pipeline.layout`): by default a batch is one packed row with each prompt computed once.
* **Length-sorted batches.** Within a shard, pairs are sorted by padded length (longest first, so a batch too
  large for memory fails at once) and cut into batches of ``precompute_ref_batch_size``; batch ``i`` goes to
  rank ``i % world``. Output rows are in ``example_id`` order regardless. A progress bar shows tokens/s.
* **Sharded, resumable output** (the format: :mod:`pipeline.reference.cache`). A shard is a contiguous range of
  ``shard_size`` example ids of one split:
  ``{split}-{index:05d}.parquet`` with ``example_id``, ``ref_chosen_logps``, ``ref_rejected_logps``,
  ``ref_chosen_public_logps``, ``ref_rejected_public_logps`` (float32; public = sum over the first
  min(|y_w|, |y_l|) completion tokens, for LD-DPO), ``chosen_length``, ``rejected_length`` (int32). Every rank
  computes its batches, the results are gathered, rank 0 writes the shard atomically with the artifact
  fingerprint in its Parquet metadata, then all ranks pass a barrier. ``manifest.json`` comes last. A rerun
  keeps every shard whose metadata, ids and values check out and computes only the others; a complete
  artifact with the same fingerprint is returned without loading the model.
* **Fingerprint** over the tokenized artifact's fingerprint, a streamed content hash of the reference weights,
  the dtype, the splits (and the example-id subset, if any), caller inputs such as TR-DPO's window, and the
  schema version. Batch size, shard size and process count change no value beyond float rounding and are
  left out, so a resume may use other ones.
* **Checks.** Before any forward: the tokenized manifest's file hashes, token ids against the model's
  vocabulary (naming artifact, split and example_id). The reader (:func:`load_reference_logps`) refuses a
  fingerprint mismatch, a missing or extra ``example_id``, a duplicate, a non-finite value.

Trade-offs: shards are the unit of resume (a kill loses at most one shard of work); gathered results go
through ``all_gather_object`` (pickled, small: 7 numbers per pair); under ZeRO-3 every rank must make the same
number of forward calls, so a rank short of batches repeats one and drops its result.

The modules: :mod:`.stage` (the scoring job) and :mod:`.cache` (the artifact's format, writer and reader: all
that training and TR-DPO import, free of torch).
"""
