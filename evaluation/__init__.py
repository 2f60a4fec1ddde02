"""The evaluation stage: coherence and fidelity of several causal LMs side by side (`python -m evaluation`).

Metrics, per model (↓ lower is better, ↑ higher is better); every one comes with a 95% percentile-bootstrap
interval over its items (prompts, rows or documents; evaluation/stats.py), and the headline ones with paired
intervals for the difference of every two models.

Natural-stop greedy continuations of --prompts (at most --max-new-tokens tokens, stopped at the tokenizer's EOS
or an end-of-turn token, which is not kept):
  seq_rep_4 ↓        mean over continuations of 1 − |unique 4-grams| / |4-grams| (Welleck et al. 2019,
                     "seq-rep-n"); 0 for a continuation of fewer than 4 tokens.
  loop_rate ↓        share of continuations that end in a loop: they ran to the cap without a stop token, and for
                     some period p in 1..16 their last L = max(3·p, 12) tokens are periodic, tail[j] == tail[j − p]
                     for p ≤ j < L (`metrics.ends_in_loop`).
  distinct_2 ↑       unique bigrams / bigrams, pooled over all of the model's continuations (Li et al. 2016); no
                     interval: resampling repeats continuations, which biases every resample of a pooled count low.
  mean_length        mean continuation length in tokens.
  length_ratio       Σ lengths / the reference's Σ lengths over the same prompts (1 for the reference).
  stopped_share      share of continuations that stopped by themselves: near 1 for the reference means the cap
                     is long enough that the natural-stop metrics see whole answers.
Length-controlled continuations of the same prompts: exactly --fixed-new-tokens tokens each, every stop token
suppressed until then (a continuation that stops early cannot loop, and seq-rep-4 grows with length, so the
natural-stop metrics favour models that answer shorter):
  fixed_seq_rep_4 ↓  seq_rep_4 of those continuations.
  fixed_loop_rate ↓  ends_in_loop of those continuations (none of them stopped).
Verifiable instructions (--instructions, IFEval format; evaluation/ifeval.py), on the natural-stop responses:
  if_prompt_strict ↑, if_prompt_loose ↑             share of prompts with every instruction followed.
  if_instruction_strict ↑, if_instruction_loose ↑   followed instructions / all instructions.
Teacher-forced on --instruct:
  kl_to_reference ↓  Σ over the tokens of every row's final assistant message of KL(reference ‖ model) / their
                     number, in nats per token. The response tokens are those of apply_chat_template(messages)
                     after apply_chat_template(messages[:-1], add_generation_prompt=True), each conversation cut
                     to --max-length tokens (a row whose prompt fills them is left out). 0 for the reference.
On --text:
  perplexity ↓       exp(Σ NLL / Σ predicted tokens), each row cut to --max-length tokens.
On --tasks:
  <task>/acc ↑       lm-eval-harness accuracy (and <task>/acc_norm when the task reports it).

The KL and the perplexity apply the LM head to the final hidden states --logit-chunk-size positions at a time,
in fp32, so no [batch, length, vocab] tensor is built (Gemma's vocabulary is 262,144).
"""
