"""A padded or packed batch split into documents, found once per forward: the real tokens of a
row (``padding_mask`` True; pads left or right), cut where ``position_ids`` do not continue by
+1, as ``DataCollatorWithFlattening`` produces. Documents of equal length are attended together
as one batch: groups, sinks and causality are per document, pads are never attended."""
import torch
from torch.utils.weak import WeakTensorKeyDictionary


def restarts(position_ids):
    """``[B, N - 1]`` bool: token ``t + 1`` does not continue token ``t``'s document."""
    if position_ids.dim() != 2:
        raise ValueError(f"position_ids must be 2-D [B, N], got shape {tuple(position_ids.shape)}")
    return position_ids.diff(dim=-1) != 1


def find_documents(padding_mask, position_ids, batch, seq_len, device):
    """The batch's documents grouped by length, or ``None`` when each row is one document:
    ``[(rows, cols), ...]``, one pair of ``[num_docs, length]`` index tensors per distinct
    length, ``(rows[d, t], cols[d, t])`` the ``t``-th token of document ``d``."""
    if position_ids is not None:
        position_ids = position_ids.to(device).expand(batch, seq_len)
    if padding_mask is None and (position_ids is None or not restarts(position_ids).any()):
        return None
    real = (padding_mask.bool() if padding_mask is not None
            else torch.ones(batch, seq_len, dtype=torch.bool, device=device))
    if position_ids is None:
        position_ids = torch.arange(seq_len, device=device).expand(batch, seq_len)
    flat = real.reshape(-1).nonzero().squeeze(1)  # real tokens, in row-major order
    rows, cols = flat // seq_len, flat % seq_len
    pos = position_ids[rows, cols]
    new_doc = torch.ones_like(flat, dtype=torch.bool)
    new_doc[1:] = (rows[1:] != rows[:-1]) | (pos[1:] != pos[:-1] + 1)
    starts = new_doc.nonzero().squeeze(1)
    lengths = torch.diff(starts, append=starts.new_tensor([flat.numel()]))
    if starts.numel() == batch and bool((lengths == seq_len).all()):
        return None
    docs = []
    for length in sorted(set(lengths.tolist())):
        tok = starts[lengths == length][:, None] + torch.arange(length, device=device)
        docs.append((rows[tok], cols[tok]))
    return docs


# Every layer of one forward gets the same padding mask and position_ids objects; finding the
# documents reads them on the host (a device sync), so it is done once per forward, not per layer.
# The split is held by a dictionary keyed weakly by the padding mask (else position_ids): it goes
# with that tensor (at the end of the forward for the mask transformers makes), and no freed
# tensor's id is mistaken for a live one. Versions show an in-place change; inference tensors
# (torch.inference_mode) have none, so they are split per layer.
_splits = WeakTensorKeyDictionary()


def attend_per_document(attend, query, key, value, padding_mask, position_ids):
    """``attend`` (``[b, Hq, L, D]`` inputs -> ``[b, L, Hq, D]``) applied per document, the
    documents found once per forward (``_splits``). Documents of equal length share one call;
    pad queries get a zero output."""
    batch, _, seq_len, _ = query.shape
    first, other = (position_ids, None) if padding_mask is None else (padding_mask, position_ids)
    if first is None or first.is_inference() or (other is not None and other.is_inference()):
        docs = find_documents(padding_mask, position_ids, batch, seq_len, query.device)
    else:
        state = (batch, seq_len, first._version, None if other is None else other._version)
        seen = _splits.get(first)
        if seen is None or seen[0] is not other or seen[1] != state:
            seen = _splits[first] = (other, state, find_documents(
                padding_mask, position_ids, batch, seq_len, query.device))
        docs = seen[2]
    if docs is None:
        return attend(query, key, value)
    outs, all_rows, all_cols = [], [], []
    for rows, cols in docs:
        # Advanced indices around a slice put the [num_docs, L] dims first: [num, L, H, D].
        q, k, v = (t[rows, :, cols].transpose(1, 2) for t in (query, key, value))
        outs.append(attend(q, k, v).flatten(0, 1))
        all_rows.append(rows.flatten())
        all_cols.append(cols.flatten())
    out = query.new_zeros(batch, seq_len, query.shape[1], query.shape[3])
    return out.index_put((torch.cat(all_rows), torch.cat(all_cols)), torch.cat(outs))
