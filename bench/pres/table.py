"""The PRES benchmark's table from its JSON lines: per data set, system, model, batch and PRES,
the mean and standard deviation over seeds of the test AP (transductive and inductive) and the
mean epoch time; then the paper's two claims, checked side by side."""

import json
import statistics
import sys
from collections import defaultdict


def main(path):
    runs = [json.loads(l) for l in open(path) if l.strip()]
    groups = defaultdict(list)
    for r in runs:
        groups[(r["data"], r["system"], r["model"], r["batch"], r["pres"])].append(r)

    def stat(rs, key):
        v = [r[key] for r in rs if r.get(key) is not None]
        if not v:
            return float("nan"), float("nan")
        return statistics.mean(v), (statistics.stdev(v) if len(v) > 1 else 0.0)

    print(f"{'data':<12} {'system':<9} {'model':<6} {'batch':>5} {'PRES':<5} {'seeds':>5} "
          f"{'test AP':>15} {'inductive AP':>15} {'epoch s':>8}")
    for key in sorted(groups):
        rs = groups[key]
        ap, ap_sd = stat(rs, "test_ap")
        iap, iap_sd = stat(rs, "test_ap_inductive")
        ep, _ = stat(rs, "epoch_s")
        data, system, model, batch, pres = key
        print(f"{data:<12} {system:<9} {model:<6} {batch:>5} {str(pres):<5} {len(rs):>5} "
              f"{100 * ap:>7.2f} ± {100 * ap_sd:<5.2f} {100 * iap:>7.2f} ± {100 * iap_sd:<5.2f} "
              f"{ep:>8.2f}")
    print()
    for data in sorted({k[0] for k in groups}):
        for model in ("TGN", "JODIE"):
            small = [k for k in groups if k[0] == data and k[1] == "lockstep" and k[2] == model
                     and not k[4]]
            if len(small) < 2:
                continue
            b = min(k[3] for k in small)
            plain_b = groups[(data, "lockstep", model, b, False)]
            plain_4b = groups.get((data, "lockstep", model, 4 * b, False), [])
            pres_4b = groups.get((data, "lockstep", model, 4 * b, True), [])
            if not pres_4b:
                continue
            ap_b, sd_b = stat(plain_b, "test_ap")
            ap_p, _ = stat(pres_4b, "test_ap")
            ap_4, _ = stat(plain_4b, "test_ap")
            speed = stat(plain_b, "epoch_s")[0] / stat(pres_4b, "epoch_s")[0]
            pace = f"{speed:.2f}x faster" if speed >= 1 else f"{1 / speed:.2f}x slower"
            print(f"{data} {model}: AP at B {100 * ap_b:.2f} ± {100 * sd_b:.2f}, at 4B plain "
                  f"{100 * ap_4:.2f}, at 4B with PRES {100 * ap_p:.2f} "
                  f"({'within' if abs(ap_p - ap_b) <= max(sd_b, 1e-9) else 'outside'} the seed "
                  f"spread); epoch at 4B with PRES {pace} than at B")
        b = min((k[3] for k in groups if k[0] == data and k[1] == "pyg-tgn"), default=None)
        pyg = groups.get((data, "pyg-tgn", "TGN", b, False))
        ours = groups.get((data, "lockstep", "TGN", b, False))
        if pyg and ours:
            print(f"{data} TGN at B={b}: Lockstep AP {100 * stat(ours, 'test_ap')[0]:.2f} vs PyG "
                  f"{100 * stat(pyg, 'test_ap')[0]:.2f}; epoch {stat(ours, 'epoch_s')[0]:.2f} s vs "
                  f"{stat(pyg, 'epoch_s')[0]:.2f} s "
                  f"({stat(pyg, 'epoch_s')[0] / stat(ours, 'epoch_s')[0]:.2f}x)")


if __name__ == "__main__":
    main(sys.argv[1])
