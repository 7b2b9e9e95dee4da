"""Does every trigger backdoor the synthetic world? Poisons it with each attack, pre-trains the
demo's tiny CLIP on it and measures CA and ASR.

    python scripts/backdoor_all_triggers.py [--config configs/bench.yaml] [--out runs/bench] [--attacks a,b]

Uses the benchmark's stages and folders, so the poisoned models it builds are the ones the
benchmark then cleans (and a re-run reuses them). Writes ``backdoors.md`` and ``backdoors.json``.
"""
import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> int:
    from par import pipeline, triggers
    from par.config import load_yaml

    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="configs/bench.yaml")
    parser.add_argument("--out", default="runs/bench")
    parser.add_argument("--attacks", help="comma-separated subset (default: the config's attacks)")
    args = parser.parse_args()
    profile = load_yaml(args.config)
    label = profile.get("label", "banana")
    names = args.attacks.split(",") if args.attacks else profile.get("attacks") or triggers.TRIGGERS.in_order()
    out = Path(args.out)
    world = pipeline.make_world_stage(profile, out)
    results = {}
    for attack in [triggers.TRIGGERS.canonical(a) for a in names]:
        started = time.time()
        params = dict((profile.get("attack_params") or {}).get(attack, {}))
        params = pipeline.prepare_attack_stage(profile, out, world, attack, label, params)
        checkpoint = pipeline.poisoned_model_stage(profile, out, world, attack, label, params).checkpoint
        metrics = pipeline.evaluate_stage(world, checkpoint, attack, label, params, profile.get("eval"))
        results[attack] = {"params": params, "checkpoint": str(checkpoint), **metrics,
                           "seconds": round(time.time() - started, 1)}
        (out / "backdoors.json").write_text(json.dumps(results, indent=2) + "\n")
        print(f"{attack}: CA {100 * metrics['clean_top1']:.1f} %, ASR {100 * metrics['asr_top1']:.1f} %")
    rate = (profile.get("poison") or {}).get("rate")
    lines = [f"Poisoned tiny CLIPs on the synthetic world (rate {rate}, target '{label}'):", "",
             "| attack | CA top-1 | ASR top-1 | ASR top-5 |", "|---|---|---|---|"]
    for attack, r in results.items():
        lines.append(f"| {triggers.get_trigger(attack).paper_name} (`{attack}`) | {100 * r['clean_top1']:.1f} | "
                     f"{100 * r['asr_top1']:.1f} | {100 * r['asr_top5']:.1f} |")
    (out / "backdoors.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
