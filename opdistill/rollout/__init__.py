"""Rollouts: the sampler seam and its engines, per-sample seeds and horizons. The log-prob helpers live a floor
below, in opdistill/logprobs.py (training, teachers, evaluation and the server share them); they are re-exported here
for the sampler's users.

Imports point one way: ..logprobs, ..data <- base (the interface) <- next_token, cache, packed, attention, schedules <-
batch (the rollout type every method trains on), hf, vllm <- engines.
Nothing here imports methods, the engine or evaluation.
"""

from ..sampling import SamplingParams
from .base import Sample, Sampler, eos_token_ids, pack_jobs
from .batch import Rollouts, data_rollouts, sample_rollouts
from .engines import ENGINES, GENERATION_ENGINES, choose_engine, generation_sampler, make_sampler
from .hf import HFSampler, sample_batch
from .next_token import draw, sample_next
from .schedules import horizon_at, rollout_seeds, row_generator, row_uniforms
from ..logprobs import (TopLogprobs, entropy_from_logits, last_positions, left_pad, logprobs_of, positions_from_mask, response_logits, response_logprobs,
                      response_targets, token_logprobs, top_k_logprobs)

__all__ = ["ENGINES", "GENERATION_ENGINES", "choose_engine", "generation_sampler", "HFSampler", "Rollouts", "Sample", "Sampler", "SamplingParams", "TopLogprobs", "draw", "entropy_from_logits", "eos_token_ids", "horizon_at", "last_positions", "left_pad", "logprobs_of",
           "data_rollouts", "make_sampler", "pack_jobs", "positions_from_mask", "response_logits", "response_logprobs", "response_targets", "rollout_seeds", "row_generator", "row_uniforms", "sample_batch", "sample_rollouts",
           "sample_next", "token_logprobs", "top_k_logprobs"]
