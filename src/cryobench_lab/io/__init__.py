"""File input/output. Readers raise ``InputError`` naming the file; writers are atomic (``io.atomic``).

- ``io.particles.load_particles``: particle file (+ optional pose/CTF pickles) → ``ParticleMetadata``;
- ``io.stacks.ImageSource``: lazy, read-by-index particle images from .mrcs/.txt/.star/.cs;
- ``io.mrc``: maps and stacks; ``io.star``: RELION STAR; ``io.cryosparc``: cryoSPARC .cs;
- ``io.pickles``: cryoDRGN pose/CTF pickles with a numpy-only unpickler;
- ``io.structures``: PDB/mmCIF atomic models (gemmi).
"""
