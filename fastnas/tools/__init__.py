"""Tools that use both a search and training: a trained supernet searched over
(``selection``, ``fastnas select``), how well it ranks architectures (``rank_eval``,
``rank_metrics``, ``scatter``, ``fastnas rank-eval``) and LA-DARTS' latency
predictor fitted on measured evaluation networks (``latency_fit``,
``fastnas latency-model``). Nothing below imports them."""
