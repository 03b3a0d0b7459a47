#!/usr/bin/env python3
"""What TLS costs a migration, one run: the test guest with 1 GiB written once (`verify
size=1G`: nothing dirtied during the move, so each figure is the cost of carrying 1 GiB)
migrated Ferry -> Ferry and QEMU -> QEMU over 1 and 4 connections, in plain TCP and in TLS
1.3 with mutual certificates (Ferry: `ferry certs`, --tls-*; QEMU: tls-creds-x509 with
verify-peer=on from the same CA, `migrate-set-parameters tls-creds`, multifd for 4
connections). Reports total time and the link rate the VMM reports, and the ratios the
issue asks for: Ferry TLS / Ferry plain, and Ferry TLS / QEMU TLS (by rate).

usage: scripts/bench_tls.py [--ferry PATH] [--no-warm]
"""
import argparse, os, shutil, sys, tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_live import common_args, guest_image, make_pki, run_ferry, run_qemu  # noqa: E402

WORK = ("1G-0", "2G", "verify size=1G hb=2000", "V0 1 ", False)


def main():
    ap = argparse.ArgumentParser()
    common_args(ap)
    a = ap.parse_args()
    a.downtime_limit, a.copy_priority = 30, "normal"
    d, image, qv = guest_image(a)
    pki = make_pki(a.ferry, tempfile.mkdtemp(prefix="ferry-bench-pki-") + "/pki")
    print(f"# {qv}; workload {WORK[0]} ({WORK[2]}, {WORK[1]} VM)")
    print("| connections | VMM | transport | total ms | link MB/s | downtime ms |")
    print("|---|---|---|---|---|---|")
    for streams in (1, 4):
        a.streams = streams
        res = {}
        for vmm, tls in (("Ferry", None), ("Ferry", pki), ("QEMU", None), ("QEMU", pki)):
            name, mem, work, ready, conv = WORK
            try:
                if vmm == "Ferry":
                    r = run_ferry(a, name, mem, work, ready, conv, tls)
                else:
                    r = run_qemu(a, image, name, mem, work, ready, conv, tls)
            except Exception as e:  # one failed run should not hide the others
                print(f"| {streams} | {vmm} | {'TLS' if tls else 'plain'} | failed: {e} | | |")
                continue
            res[(vmm, bool(tls))] = r
            print(f"| {streams} | {vmm} | {'TLS' if tls else 'plain'} | {r['total_ms']:.0f} | "
                  f"{r['mbps'] / 8:.0f} | {r['downtime_ms']:.1f} |", flush=True)
        ft, fp, qt = res.get(("Ferry", True)), res.get(("Ferry", False)), res.get(("QEMU", True))
        if ft and fp:
            print(f"| {streams} | Ferry TLS / Ferry plain | | "
                  f"{fp['total_ms'] / ft['total_ms']:.2f}× speed | "
                  f"{ft['mbps'] / fp['mbps']:.2f}× | |")
        if ft and qt:
            print(f"| {streams} | Ferry TLS / QEMU TLS | | "
                  f"{qt['total_ms'] / ft['total_ms']:.2f}× speed | "
                  f"{ft['mbps'] / qt['mbps']:.2f}× | |", flush=True)
    shutil.rmtree(d, ignore_errors=True)
    shutil.rmtree(os.path.dirname(pki), ignore_errors=True)


if __name__ == "__main__":
    main()
