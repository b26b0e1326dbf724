"""PyTorch Geometric's TGN (its examples/tgn.py model: TGNMemory with identity messages and the
last aggregator, GraphAttentionEmbedding over TransformerConv with 2 heads, the LinkPredictor,
Adam lr 1e-4, BCE, one random negative per event) on Lockstep's split of the same file, for the
side-by-side benchmark (bench/pres/run.sh).

What still differs from Lockstep's TGN, so that the comparison reads right: PyG scores
validation and test with the memory the last training epoch left (Lockstep replays the training
stream with the final parameters first); PyG draws negatives from each split's own destination id
range (Lockstep from every node id); PyG keeps TransformerConv's dropout 0.1 (Lockstep has none);
PyG's time encoding starts from nn.Linear's default (Lockstep's from TGN's 10^(-9k/(d-1))
frequencies); PyG embeds each node once per batch as Lockstep does.

The split and the node ids are Lockstep's (worker/src/data/temporal.rs): ids by first appearance,
events sorted by time (stably), cuts at 70% and 85% moved past timestamp ties. Prints one JSON
line: the epoch times and the last epoch's test AP and AUC, transductive and inductive (events
touching a node no training event touches; AP per chunk of 200 such events, averaged).
"""

import argparse
import gzip
import json
import time

import numpy as np
import torch
from sklearn.metrics import average_precision_score, roc_auc_score
from torch.nn import Linear
from torch_geometric.data import TemporalData
from torch_geometric.loader import TemporalDataLoader
from torch_geometric.nn import TGNMemory, TransformerConv
from torch_geometric.nn.models.tgn import IdentityMessage, LastAggregator, LastNeighborLoader


def load(path):
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        lines = [l.strip() for l in f if l.strip()]
    ids = {}

    def node(v):
        return ids.setdefault(v, len(ids))

    events = []
    if lines[0].startswith("#"):
        for l in lines[1:]:
            s, d, r, t = l.split(",")
            events.append((node(int(s)), node(int(d)), float(t), [float(r) / 10.0]))
    else:
        for l in lines:
            s, d, t = l.split()
            events.append((node(int(s)), node(int(d)), float(t), []))
    events.sort(key=lambda e: e[2])
    n = len(events)

    def cut(share):
        i = int(round(n * share))
        while 0 < i < n and events[i][2] == events[i - 1][2]:
            i += 1
        return i

    train_end, val_end = cut(0.70), cut(0.85)
    src = torch.tensor([e[0] for e in events])
    dst = torch.tensor([e[1] for e in events])
    t = torch.tensor([e[2] for e in events], dtype=torch.float64)
    # PyG's message store cannot hold messages of width 0: a featureless set gets one zero
    # feature, which adds nothing (its weights multiply 0).
    dim = max(len(events[0][3]), 1)
    msg = torch.zeros(n, dim)
    if events[0][3]:
        msg = torch.tensor([e[3] for e in events], dtype=torch.float32)
    seen = torch.zeros(len(ids), dtype=torch.bool)
    seen[src[:train_end]] = True
    seen[dst[:train_end]] = True
    inductive = ~(seen[src] & seen[dst])
    return src, dst, t, msg, train_end, val_end, len(ids), inductive


class GraphAttentionEmbedding(torch.nn.Module):
    def __init__(self, in_channels, out_channels, msg_dim, time_enc):
        super().__init__()
        self.time_enc = time_enc
        edge_dim = msg_dim + time_enc.out_channels
        self.conv = TransformerConv(
            in_channels, out_channels // 2, heads=2, dropout=0.1, edge_dim=edge_dim
        )

    def forward(self, x, last_update, edge_index, t, msg):
        rel_t = last_update[edge_index[0]] - t
        rel_t_enc = self.time_enc(rel_t.to(x.dtype))
        edge_attr = torch.cat([rel_t_enc, msg], dim=-1)
        return self.conv(x, edge_index, edge_attr)


class LinkPredictor(torch.nn.Module):
    def __init__(self, in_channels):
        super().__init__()
        self.lin_src = Linear(in_channels, in_channels)
        self.lin_dst = Linear(in_channels, in_channels)
        self.lin_final = Linear(in_channels, 1)

    def forward(self, z_src, z_dst):
        h = self.lin_src(z_src) + self.lin_dst(z_dst)
        return self.lin_final(h.relu())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--batch", type=int, default=200)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--memory", type=int, default=172)
    ap.add_argument("--time", type=int, default=100)
    ap.add_argument("--embedding", type=int, default=100)
    a = ap.parse_args()
    torch.manual_seed(a.seed)
    src, dst, t, msg, train_end, val_end, num_nodes, inductive = load(a.data)
    # TGNMemory keeps times as int64 (seconds): the SNAP files' fractional seconds are floored.
    data = TemporalData(src=src, dst=dst, t=t.floor().long(), msg=msg)
    train, val, test = data[:train_end], data[train_end:val_end], data[val_end:]
    loaders = {
        name: TemporalDataLoader(d, batch_size=a.batch if name == "train" else 200,
                                 neg_sampling_ratio=1.0)
        for name, d in (("train", train), ("val", val), ("test", test))
    }
    neighbor_loader = LastNeighborLoader(num_nodes, size=10)
    memory = TGNMemory(num_nodes, msg.size(-1), a.memory, a.time,
                       message_module=IdentityMessage(msg.size(-1), a.memory, a.time),
                       aggregator_module=LastAggregator())
    gnn = GraphAttentionEmbedding(a.memory, a.embedding, msg.size(-1), memory.time_enc)
    link_pred = LinkPredictor(a.embedding)
    params = set(memory.parameters()) | set(gnn.parameters()) | set(link_pred.parameters())
    optimizer = torch.optim.Adam(params, lr=0.0001)
    criterion = torch.nn.BCEWithLogitsLoss()
    assoc = torch.empty(num_nodes, dtype=torch.long)

    def step(batch, train_mode):
        n_id, edge_index, e_id = neighbor_loader(batch.n_id)
        assoc[n_id] = torch.arange(n_id.size(0))
        z, last_update = memory(n_id)
        z = gnn(z, last_update, edge_index, data.t[e_id], data.msg[e_id])
        pos = link_pred(z[assoc[batch.src]], z[assoc[batch.dst]])
        neg = link_pred(z[assoc[batch.src]], z[assoc[batch.neg_dst]])
        memory.update_state(batch.src, batch.dst, batch.t, batch.msg)
        neighbor_loader.insert(batch.src, batch.dst)
        return pos, neg

    def train_epoch():
        memory.train(); gnn.train(); link_pred.train()
        memory.reset_state(); neighbor_loader.reset_state()
        for batch in loaders["train"]:
            optimizer.zero_grad()
            pos, neg = step(batch, True)
            loss = criterion(pos, torch.ones_like(pos)) + criterion(neg, torch.zeros_like(neg))
            loss.backward()
            optimizer.step()
            memory.detach()

    @torch.no_grad()
    def evaluate(name, offset):
        memory.eval(); gnn.eval(); link_pred.eval()
        torch.manual_seed(12345)
        aps, aucs, ind = [], [], []
        at = offset
        for batch in loaders[name]:
            pos, neg = step(batch, False)
            p, n = pos.sigmoid().view(-1), neg.sigmoid().view(-1)
            y = torch.cat([torch.ones_like(p), torch.zeros_like(n)])
            s = torch.cat([p, n])
            aps.append(average_precision_score(y, s))
            aucs.append(roc_auc_score(y, s))
            b = p.numel()
            mask = inductive[at:at + b]
            ind.extend(zip(p[mask].tolist(), n[mask].tolist()))
            at += b
        iap = []
        for i in range(0, len(ind), 200):
            chunk = ind[i:i + 200]
            y = [1] * len(chunk) + [0] * len(chunk)
            s = [c[0] for c in chunk] + [c[1] for c in chunk]
            iap.append(average_precision_score(y, s))
        return float(np.mean(aps)), float(np.mean(aucs)), float(np.mean(iap)) if iap else None

    epoch_s = []
    for _ in range(a.epochs):
        start = time.perf_counter()
        train_epoch()
        epoch_s.append(time.perf_counter() - start)
    # Scored once, after the last epoch (the reference scores after each; the figures of the
    # last are the same).
    val = evaluate("val", train_end)
    test = evaluate("test", val_end)
    print(json.dumps({
        "system": "pyg-tgn", "batch": a.batch, "seed": a.seed, "epochs": a.epochs,
        "epoch_s": epoch_s, "val_ap": val[0], "test_ap": test[0], "test_auc": test[1],
        "test_ap_inductive": test[2], "threads": torch.get_num_threads(),
    }))


if __name__ == "__main__":
    main()
