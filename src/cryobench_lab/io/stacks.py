"""``ImageSource``: the one lazy particle-image reader the DataModule uses.

An image source is a list of (stack file, 0-based index) pairs, one per particle, in particle order. Every
file and index is validated when the source is built; image data are read on demand from positioned reads of the
files, so a dataset larger than RAM is never loaded whole.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pandas as pd

from cryobench_lab.errors import InputError
from cryobench_lab.io.cryosparc import read_cs
from cryobench_lab.io.mrc import MRCStack
from cryobench_lab.io.star import image_locations, read_star, resolve_path

STACK_SUFFIXES = (".mrcs", ".mrc", ".map", ".st")


class ImageSource:
    """Lazy reader of particle images from one or more MRC stacks.

    Args:
        paths: stack file of each particle (length N).
        indices: 0-based image index of each particle within its stack (length N).
        source: the metadata file the pairs came from, named in error messages.
        max_open: at most this many stack files stay open at once (least recently used are closed),
            so datasets split over thousands of per-micrograph stacks do not exhaust file handles.

    Attributes: ``n`` particles, ``D`` box size (px), ``apix`` pixel size from the first stack's header
    (Å, 0.0 when unset; the headers are often wrong, see ``io.particles`` for the pixel size to trust).
    """

    def __init__(self, paths, indices, source: str | os.PathLike | None = None, max_open: int = 64):
        paths = [str(p) for p in paths]
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        if len(paths) != len(indices):
            raise ValueError(f"ImageSource: {len(paths)} paths but {len(indices)} indices")
        self.source = str(source) if source is not None else None
        self.max_open = max_open
        where = f"{self.source}: " if self.source else ""
        if len(paths) == 0:
            raise InputError(f"{where}no particle images listed; check the particle file")

        # factorize hashes the strings (no fixed-width unicode copy of a million paths); ids follow the
        # order of first appearance.
        file_ids, unique = pd.factorize(pd.Series(paths, dtype=object))
        self.files: list[str] = [str(u) for u in unique]
        self._file_ids = file_ids.astype(np.int64)  # (N,) index into self.files
        self._indices = indices  # (N,) image index within its file
        self._stacks: list[MRCStack] = []
        rows_by_file = np.split(np.argsort(self._file_ids, kind="stable"),
                                np.cumsum(np.bincount(self._file_ids, minlength=len(self.files)))[:-1])
        for file, rows in zip(self.files, rows_by_file):
            if not Path(file).is_file():
                raise InputError(f"{where}row {rows[0] + 1} refers to {file}, which does not exist; check "
                                 "the path or pass data.datadir=")
            stack = MRCStack(file)
            local = indices[rows]
            bad = rows[(local < 0) | (local >= stack.n)]
            if len(bad):
                row = int(bad[0])
                raise InputError(f"{where}row {row + 1} asks for image {indices[row] + 1} (1-based) of {file}, "
                                 f"which holds {stack.n} images; the metadata does not match the stack")
            if self._stacks and stack.D != self._stacks[0].D:
                raise InputError(f"{where}{file} has {stack.D} px images but {self.files[0]} has "
                                 f"{self._stacks[0].D} px; all stacks must share one box size")
            self._stacks.append(stack)
        self._refuse_duplicates(where)
        self.n = len(indices)
        self.D = self._stacks[0].D
        self.apix = self._stacks[0].apix  # the first particle's stack (ids follow first appearance)
        self._open: OrderedDict[int, None] = OrderedDict()  # file ids with an open handle, LRU order

    def _refuse_duplicates(self, where: str) -> None:
        """Two rows naming the same image of the same file are one particle counted twice (a merge gone
        wrong); training would weight it double and the per-image tables could not tell the rows apart."""
        key = self._file_ids * (int(self._indices.max()) + 1) + self._indices  # (N,) one id per image
        order = np.argsort(key, kind="stable")
        repeat = np.flatnonzero(key[order][1:] == key[order][:-1])
        if len(repeat):
            first, second = sorted((int(order[repeat[0]]), int(order[repeat[0] + 1])))
            raise InputError(f"{where}rows {first + 1} and {second + 1} both name image {self._indices[first] + 1} "
                             f"of {self.files[self._file_ids[first]]} ({len(repeat)} duplicate row(s) in all); "
                             "remove the duplicates so each particle appears once")

    def __len__(self) -> int:
        return self.n

    def _stack(self, file_id: int) -> MRCStack:
        """The stack for ``file_id``, closing the least recently used one beyond ``max_open``."""
        self._open[file_id] = None
        self._open.move_to_end(file_id)
        while len(self._open) > self.max_open:
            old, _ = self._open.popitem(last=False)
            self._stacks[old].close()
        return self._stacks[file_id]

    def read(self, indices) -> np.ndarray:
        """Particles ``indices`` (0-based, int or int array, any order) as ``(n, D, D)`` float32.

        Requests are sorted by (file, image) and each run of consecutive images in one file is a single
        slice read; the output follows the requested order.
        """
        idx = np.atleast_1d(np.asarray(indices, dtype=np.int64))
        if idx.size and (idx.min() < 0 or idx.max() >= self.n):
            raise IndexError(f"particle index out of range 0..{self.n - 1}: {int(idx.min())}..{int(idx.max())}")
        out = np.empty((len(idx), self.D, self.D), dtype=np.float32)  # (n, D, D)
        if not len(idx):
            return out
        files = self._file_ids[idx]
        local = self._indices[idx]
        order = np.lexsort((local, files))
        f_sorted, l_sorted = files[order], local[order]
        # A run continues while the file is the same and the image index goes up by exactly one.
        breaks = np.flatnonzero((np.diff(f_sorted) != 0) | (np.diff(l_sorted) != 1)) + 1
        starts = np.concatenate([[0], breaks])
        ends = np.concatenate([breaks, [len(idx)]])
        for s, e in zip(starts, ends):
            first = int(l_sorted[s])
            images = self._stack(int(f_sorted[s])).read(slice(first, first + (e - s)))  # (e - s, D, D)
            out[order[s:e]] = images
        return out

    def close(self) -> None:
        """Close every stack file (they reopen on the next ``read``)."""
        for file_id in self._open:
            self._stacks[file_id].close()
        self._open.clear()

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_open"] = OrderedDict()  # the stacks drop their maps when pickled too
        return state

    def __repr__(self) -> str:
        return f"ImageSource(n={self.n}, D={self.D}, files={len(self.files)}, source={self.source!r})"

    @classmethod
    def from_path(cls, path: str | os.PathLike, datadir: str | os.PathLike | None = None) -> ImageSource:
        """Build a source from a particle file.

        - ``.mrcs`` / ``.mrc``: every image of that stack;
        - ``.txt``: one stack path per line (relative to the txt file's folder), all images of each;
        - ``.star``: ``rlnImageName`` of each row (relative to ``datadir`` or the star's folder);
        - ``.cs``: ``blob/path`` and ``blob/idx`` (relative to ``datadir`` or the .cs file's folder).
        """
        path = Path(path)
        suffix = path.suffix.lower()
        if not path.is_file():
            raise InputError(f"{path}: file not found; check data.particles")
        if suffix in STACK_SUFFIXES:
            n = MRCStack(path).n
            return cls([str(path.resolve())] * n, np.arange(n), source=path)
        if suffix == ".txt":
            base = path.resolve().parent
            lines = [ln.strip() for ln in path.read_text().splitlines()]
            stacks = [resolve_path(ln, base) for ln in lines if ln and not ln.startswith("#")]
            if not stacks:
                raise InputError(f"{path}: lists no stack files; put one .mrcs path per line")
            paths: list[str] = []
            indices: list[np.ndarray] = []
            for row, stack_path in enumerate(stacks):
                if not stack_path.is_file():
                    raise InputError(f"{path}: line {row + 1} refers to {stack_path}, which does not exist; "
                                     "paths are relative to the .txt file's folder")
                n = MRCStack(stack_path).n
                paths += [str(stack_path)] * n
                indices.append(np.arange(n))
            return cls(paths, np.concatenate(indices), source=path)
        if suffix == ".star":
            return cls.from_star(read_star(path), path, datadir)
        if suffix == ".cs":
            return cls.from_cs(read_cs(path), path, datadir)
        raise InputError(f"{path}: unknown particle file type {suffix!r}; use .mrcs, .mrc, .txt, .star or .cs")

    @classmethod
    def from_star(cls, df, star_path: str | os.PathLike, datadir: str | os.PathLike | None = None) -> ImageSource:
        """Images of a particle table from ``read_star`` (paths relative to ``datadir`` or the star's folder)."""
        paths, indices = image_locations(df, star_path, datadir)
        return cls(paths, indices, source=star_path)

    @classmethod
    def from_cs(cls, cs: dict, cs_path: str | os.PathLike, datadir: str | os.PathLike | None = None) -> ImageSource:
        """Images of a ``read_cs`` dict (paths relative to ``datadir`` or the .cs file's folder)."""
        if cs["paths"] is None or cs["indices"] is None:
            raise InputError(f"{cs_path}: no blob/path and blob/idx fields, so no images; export the "
                             "particles (not only alignments) from cryoSPARC")
        base = Path(datadir) if datadir is not None else Path(cs_path).resolve().parent
        resolved = {p: str(resolve_path(p, base)) for p in set(cs["paths"])}
        return cls([resolved[p] for p in cs["paths"]], cs["indices"], source=cs_path)
