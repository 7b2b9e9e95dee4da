"""Runs several ``par`` commands one after another in the same torchrun processes and process group (one
launch, one rendezvous, one interpreter start per rank for them all): ``torchrun ... tests/torchrun_many.py
ARGV_JSON`` where ARGV_JSON holds a list of argument lists. Each command's exit status is printed as
``exit <i> <code of rank 0> <code of rank 1> ...`` (by rank 0). The group is this program's: the trainings join it and leave it up."""
import json
import sys

import torch.distributed

from par.app.cli import main

if __name__ == "__main__":
    torch.distributed.init_process_group("gloo")
    for i, argv in enumerate(json.loads(open(sys.argv[1]).read())):
        codes = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(codes, main(argv))  # every rank ends a command before the next
        if torch.distributed.get_rank() == 0:
            print(f"exit {i} {' '.join(map(str, codes))}", flush=True)
    torch.distributed.barrier()  # no rank tears its side of the group down while a peer still uses it
    torch.distributed.destroy_process_group()
