"""The evaluation stage: coherence and fidelity of several causal LMs side by side (`python -m evaluation`).

Every metric's exact definition (seq_rep_4, loop_rate, distinct_2, the IFEval shares, kl_to_reference,
perplexity, ...) and how its interval is taken: docs/architecture.md, sections "Metrics" and "Intervals".
"""
