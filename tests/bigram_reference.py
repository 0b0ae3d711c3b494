"""A bigram "model" and its hand-written NumPy log-likelihoods: the independent reference that the
payoff tests (imitation, DPO/IPO) compare against."""
import numpy as np


def bigram_apply(params, tokens, positions, segment_ids):
  """logits of token t+1 given token t: a row of ``params["table"]``."""
  del positions, segment_ids
  return params["table"][tokens]


def np_log_softmax(row):
  row = np.asarray(row, np.float64)
  m = row.max()
  return row - m - np.log(np.exp(row - m).sum())


def np_token_logliks(table, tokens, players, segments, who):
  """Per row: (sum, count) over t with t+1 in the same segment and moved by ``who`` of
  log softmax(table[x_t])[x_{t+1}], in float64 with plain loops."""
  tokens, players, segments = map(np.asarray, (tokens, players, segments))
  B, T = tokens.shape
  sums, counts = np.zeros(B), np.zeros(B, np.int64)
  for b in range(B):
    for t in range(T - 1):
      if segments[b, t] == 0 or segments[b, t + 1] != segments[b, t]:
        continue
      if players[b, t + 1] not in who:
        continue
      sums[b] += np_log_softmax(table[tokens[b, t]])[tokens[b, t + 1]]
      counts[b] += 1
  return sums, counts


def np_next_token_logliks(table, tokens, players, segments, who):
  """``[B, T]``: at ``t``, log softmax(table[x_t])[x_{t+1}] where token t+1 continues the segment
  and was moved by ``who``; 0 elsewhere (the alignment of ``records.next_token_weights``)."""
  tokens, players, segments = map(np.asarray, (tokens, players, segments))
  B, T = tokens.shape
  out = np.zeros((B, T))
  for b in range(B):
    for t in range(T - 1):
      if segments[b, t] and segments[b, t + 1] == segments[b, t] and players[b, t + 1] in who:
        out[b, t] = np_log_softmax(table[tokens[b, t]])[tokens[b, t + 1]]
  return out
