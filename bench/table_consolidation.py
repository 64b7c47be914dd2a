"""Projection matching from a run's pose table: does searching against the table's own backprojection pull
images of a pseudo-symmetric particle into one orientation? (issue 9; the reason for ``poses.reference: table``)

    .venv/bin/python bench/table_consolidation.py <checkpoint.ckpt> <state> <class> [fsc|constant|truth] [cache folder]

Takes the images of ground-truth ``state`` of a simulated preset (default: the tomotwin3 cache) and their poses
in ``class`` of the checkpoint's pose table, then repeats: Wiener backprojection of the images at their current
poses → global search of every image against it. Prints per round the seconds and the clusters of residual
rotations (bench/abinit_pose_errors.py): one cluster is a solved state. ``truth`` instead searches once against
the state's ground-truth volume: how far the data alone determine the poses.
"""

import json
import pickle
import sys
import time
from pathlib import Path

import mrcfile
import numpy as np
import torch

from cryobench_lab.physics.backprojection import wiener_solve
from cryobench_lab.physics.ctf import ctf_image
from cryobench_lab.physics.fft import fft2_center, ifft3_center
from cryobench_lab.physics.rotations import axis_angle_to_matrix
from cryobench_lab.physics.shift import phase_shift_2d
from cryobench_lab.physics.slicing import insert_slices, volume_spectrum
from cryobench_lab.poses.search import PoseSearch, SearchConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
from abinit_pose_errors import residual_clusters  # noqa: E402


def wiener_volume(spectra, ctf, rot, trans, wiener: str = "fsc", reg: float = 0.1) -> torch.Tensor:
    """Real-space Wiener backprojection (D, D, D) of centred spectra (n, D, D) at poses rot, trans (px), from
    even/odd half sets (physics.backprojection.wiener_solve)."""
    D = spectra.shape[-1]
    Y, C2 = phase_shift_2d(spectra, trans) * ctf, ctf.square()
    sums = [insert_slices(Y[h::2], rot[h::2], C2[h::2], vol_box=D) for h in (0, 1)]
    V, _ = wiener_solve(torch.stack([s[0] for s in sums]), torch.stack([s[1] for s in sums]), wiener, reg)
    return ifft3_center(V).real


def main(checkpoint: str, state: int, cls: int, wiener: str = "fsc", cache: str | None = None, rounds: int = 6) -> None:
    folder = Path(cache) if cache else next((Path.home() / ".cache/cryobench_lab").glob("tomotwin3-*"))
    meta = json.loads((folder / "meta.json").read_text())
    D = meta["box_size"]
    labels = np.load(folder / "labels.npy")
    idx = torch.as_tensor(np.nonzero(labels == state)[0])
    images = torch.as_tensor(mrcfile.read(folder / "particles.mrcs").copy()).float()[idx]
    with open(folder / "poses.pkl", "rb") as f:
        R_true = torch.as_tensor(pickle.load(f)[0]).float()[idx]
    with open(folder / "ctf.pkl", "rb") as f:
        ctf = ctf_image(torch.as_tensor(pickle.load(f)).float()[idx], D)
    noise = torch.full((D // 2 + 1,), D**2 * meta["noise_sigma"] ** 2)
    sd = torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"]
    N, K = sd["poses.rot"].shape[:2]
    rot = (axis_angle_to_matrix(sd["poses.rot_delta.weight"].reshape(N, K, 3)) @ sd["poses.rot"])[idx, cls]
    trans = (sd["poses.trans"] + sd["poses.trans_delta.weight"])[idx]
    spectra = fft2_center(images)
    print("start", residual_clusters(rot, R_true), flush=True)
    for r in range(1 if wiener == "truth" else rounds):
        t0 = time.time()
        if wiener == "truth":  # images are −CTF·projection·apix when the preset inverts them (meta.json)
            vol = torch.as_tensor(mrcfile.read(folder / f"gt_volumes/state_{state:03d}.mrc").copy()).float() * meta["apix"]
            vol = -vol if meta.get("invert") else vol
        else:
            vol = wiener_volume(spectra, ctf, rot, trans, wiener)
        search = PoseSearch(volume_spectrum(vol, 2), D, config=SearchConfig(n_keep=8))
        out = [search.search(spectra[b : b + 100], ctf[b : b + 100], noise) for b in range(0, len(idx), 100)]
        rot, trans = torch.cat([o["rot"] for o in out]), torch.cat([o["trans"] for o in out])
        print(f"round {r}: {time.time() - t0:.0f} s", residual_clusters(rot, R_true), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), *sys.argv[4:6])
