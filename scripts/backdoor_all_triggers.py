"""Does every trigger backdoor the synthetic world, and at what poisoning rate? Poisons the world
with each attack, builds the poisoned tiny CLIP as the profile says (a fine-tune of the clean
foundation, or pre-training from scratch) and measures CA and ASR.

    python scripts/backdoor_all_triggers.py [--config configs/bench.yaml] [--out runs/bench] [--attacks a,b]
        [--rates 0.003,0.01,0.02,0.05 [--start 0.01] [--target 0.9]]

With ``--rates``, finds per attack the lowest listed rate whose ASR top-1 reaches ``--target``:
it starts at ``--start`` and walks down while the attack succeeds and up while it fails (ASR
grows with the rate). Uses the benchmark's stages and folders, so the poisoned models it builds
are the ones the benchmark then cleans. Writes ``backdoors.md`` and ``backdoors.json``.
"""
import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

from par import attacks
from par.app import pipeline
from par.app.profile import Profile


def main(argv=None) -> int:

    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="configs/bench.yaml")
    parser.add_argument("--out", default="runs/bench")
    parser.add_argument("--attacks", help="comma-separated subset (default: the config's attacks)")
    parser.add_argument("--rates", help="comma-separated poisoning rates to search (default: the config's rate)")
    parser.add_argument("--start", type=float, help="the rate to try first (default: the middle one)")
    parser.add_argument("--target", type=float, default=0.9, help="ASR top-1 that counts as backdoored")
    args = parser.parse_args(argv)
    profile = Profile.load(args.config)
    label = profile.label
    names = args.attacks.split(",") if args.attacks else profile.attacks or attacks.TRIGGERS.in_order()
    out = Path(args.out)
    world = pipeline.make_world_stage(profile, out)
    results, tried = {}, []
    rates = sorted(float(r) for r in args.rates.split(",")) if args.rates else None

    def measure(attack: str, rate=None) -> dict:
        started = time.time()
        given = dict(profile.attack_params.get(attack) or {})
        params = pipeline.prepare_attack_stage(profile, out, world, attack, label, given)
        run = profile if rate is None else replace(profile, poison_rates={**profile.poison_rates, attack: rate})
        checkpoint = pipeline.poisoned_model_stage(run, out, world, attack, label, params).checkpoint
        metrics = pipeline.evaluate_stage(world, checkpoint, attack, label, params, profile.eval)
        used = run.poison_values(attack)
        row = {"attack": attack, "rate": used.get("rate"), "num": used.get("num"), "params": given,
               "checkpoint": str(checkpoint), **metrics, "seconds": round(time.time() - started, 1)}
        tried.append(row)
        (out / "backdoors.json").write_text(json.dumps({"lowest": results, "tried": tried}, indent=2) + "\n")
        print(f"{attack} at rate {row['rate']}: CA {100 * metrics['clean_top1']:.1f} %, "
              f"ASR {100 * metrics['asr_top1']:.1f} % (top-5 {100 * metrics['asr_top5']:.1f} %)", flush=True)
        return row

    for attack in [attacks.TRIGGERS.canonical(a) for a in names]:
        if rates is None:
            results[attack] = measure(attack)
            continue
        i = rates.index(args.start) if args.start in rates else (len(rates) - 1) // 2
        done, best = {}, None
        while 0 <= i < len(rates) and i not in done:
            done[i] = measure(attack, rates[i])
            if done[i]["asr_top1"] >= args.target:
                best = done[i]
                i -= 1
            else:
                i += 1
        results[attack] = best or {**done[max(done)], "missed": True}
        (out / "backdoors.json").write_text(json.dumps({"lowest": results, "tried": tried}, indent=2) + "\n")
    lines = [f"Poisoned tiny CLIPs on the synthetic world ({profile.poisoning_mode()}, target '{label}'"
             + (f"; lowest rate of {args.rates} reaching ASR >= {100 * args.target:.0f} %" if rates else "") + "):",
             "", "| attack | rate | CA top-1 | ASR top-1 | ASR top-5 |", "|---|---|---|---|---|"]
    for attack, r in results.items():
        missed = " (missed)" if r.get("missed") else ""
        lines.append(f"| {attacks.get_trigger(attack).paper_name} (`{attack}`) | {r['rate']}{missed} | "
                     f"{100 * r['clean_top1']:.1f} | {100 * r['asr_top1']:.1f} | {100 * r['asr_top5']:.1f} |")
    (out / "backdoors.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
