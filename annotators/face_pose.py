"""Face detection, 5-point landmarks and a landmark-based head-pose estimate (MTCNN).

``face_pose`` (the registered name) wraps facenet-pytorch's MTCNN, whose P/R/O-Net weights ship inside
the ``facenet_pytorch`` package, so it runs offline. For each image the most probable face is
kept and these scores are returned, each ``(B,)`` float32:

* ``face_prob`` - MTCNN's detection probability of that face; 0 when no face is found.
* ``face_x0, face_y0, face_x1, face_y1`` - its box, divided by the image width / height (so in
  [0, 1] for a box inside the image; MTCNN boxes may overhang the border slightly).
* ``lm_{left_eye,right_eye,nose,mouth_left,mouth_right}_{x,y}`` - the 5 landmarks, normalised the
  same way. "left"/"right" are image sides, as facenet orders them: ``left_eye`` is the eye with
  the smaller x in an upright face (the subject's right eye), ``mouth_left`` the mouth corner on the
  image's left.
* ``yaw, pitch, roll`` - head pose in degrees (see below).

Every geometric output is NaN when no face is found.

Pose estimator
--------------
A generic, mirror-symmetric 3D model of the five points is fitted to the detected landmarks with
a scaled-orthographic (weak-perspective) camera, and the rotation is read off as Euler angles.

* Model (units of the inter-ocular distance, camera axes x right, y down, z away from the
  camera): eyes at (+-0.5, 0, 0), nose tip at (0, 0.57, -0.45), mouth corners at
  (+-0.41, 1.15, 0). x and y are the mean frontal 5-point template used for face alignment
  (ArcFace's 112x112 template, symmetrised); the nose depth (about 28 mm for a 63 mm
  inter-pupillary distance) is a rough anthropometric value, not calibrated.
* Fit: ``A = argmin ||P_c - X_c A^T||`` over 2x3 matrices (least squares on centred points);
  the nearest matrix with orthonormal rows ``U V^T`` (from the SVD ``A = U S V^T``) gives the
  first two rows of the rotation R, the third is their cross product.
* Euler angles of ``R = Rz(roll) Ry(-yaw) Rx(-pitch)`` (intrinsic z-y-x), reported with these
  signs:

  - ``yaw > 0``: the face turns towards the image's right (the nose moves right of the eye/mouth
    midline; the subject looks to their own left);
  - ``pitch > 0``: the face tilts up (chin up; the nose moves up towards the eye line);
  - ``roll > 0``: the head is rotated clockwise in the image (the eye on the image's right is
    lower).

  Mirroring an image left-right flips the signs of yaw and roll and keeps pitch (the model is
  symmetric, so this holds exactly for mirrored landmarks).

Limits: all angles are approximate. Yaw and pitch come only from the nose's offset relative to
the eye/mouth frame, so their scale depends on the assumed nose depth (roughly inversely for
small angles), and individual face proportions or expression (an open or smiling mouth moves
the mouth corners) bias pitch by several degrees - a frontal face gives about 0 only if its
proportions match the template. Weak perspective ignores perspective distortion of close-up
shots. MTCNN's landmarks are unreliable on small faces (under ~40 px) and for near-profile views
(|yaw| beyond ~45 degrees), where the estimate saturates. Roll (the eye line's angle) is the most
reliable of the three.

Input: images (B, 3, H, W) in [-1, 1]; they are scaled to MTCNN's uint8 range [0, 255], and an
image whose shorter side is below ``detect_size`` (default 160 px) is upsampled first, since
MTCNN's smallest detectable face is ``min_face_size`` (20) px.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from annotators.base import Annotator
from pipeline.errors import ConfigError, ModelLoadError

LANDMARKS = ("left_eye", "right_eye", "nose", "mouth_left", "mouth_right")
BOX = ("face_x0", "face_y0", "face_x1", "face_y1")
LANDMARK_KEYS = tuple(f"lm_{name}_{axis}" for name in LANDMARKS for axis in ("x", "y"))
POSE = ("yaw", "pitch", "roll")

#: Generic 5-point face model, in units of the inter-ocular distance; camera axes x right, y down,
#: z away from the camera; rows in facenet's landmark order.
MODEL_POINTS = np.array([
    [-0.5, 0.0, 0.0],      # left eye (image side)
    [0.5, 0.0, 0.0],       # right eye
    [0.0, 0.57, -0.45],    # nose tip, in front of the eye/mouth plane
    [-0.41, 1.15, 0.0],    # mouth left
    [0.41, 1.15, 0.0],     # mouth right
])


def pose_from_landmarks(points: np.ndarray, model: np.ndarray = MODEL_POINTS) -> tuple[float, float, float]:
    """(yaw, pitch, roll) in degrees from 5 landmarks ``points`` (5, 2) in pixels (x right, y
    down), by a scaled-orthographic fit of ``model`` (5, 3); conventions in the module docstring."""
    p = np.asarray(points, dtype=np.float64)
    x = np.asarray(model, dtype=np.float64)
    pc, xc = p - p.mean(0), x - x.mean(0)
    a_t, *_ = np.linalg.lstsq(xc, pc, rcond=None)       # (3, 2): pc ~ xc @ a_t
    u, _, vt = np.linalg.svd(a_t.T, full_matrices=False)  # A (2, 3) = U S Vt
    r12 = u @ vt                                         # orthonormal rows closest to A
    r = np.vstack([r12, np.cross(r12[0], r12[1])])
    theta = math.asin(float(np.clip(-r[2, 0], -1.0, 1.0)))  # about the vertical axis
    phi = math.atan2(r[2, 1], r[2, 2])                       # about the horizontal axis
    psi = math.atan2(r[1, 0], r[0, 0])                       # in the image plane
    # Ry(theta > 0) moves the nose (z < 0) to the image's left and Rx(phi > 0) moves it down
    return -math.degrees(theta), -math.degrees(phi), math.degrees(psi)


class FacePoseAnnotator(Annotator):
    """MTCNN face box, 5 landmarks and landmark-based yaw/pitch/roll; see the module docstring.

    Options: ``detect_size`` (upsample images whose shorter side is smaller, px; default 160),
    ``min_face_size`` (MTCNN's smallest face, px of the detection image; default 20),
    ``thresholds`` (MTCNN's three stage thresholds; default (0.6, 0.7, 0.7)).
    """

    name = "face_pose"
    attributes = ("face_prob",) + BOX + LANDMARK_KEYS + POSE
    may_be_missing = BOX + LANDMARK_KEYS + POSE  # NaN when no face is found
    input_size = None
    mean = (0.0, 0.0, 0.0)
    std = (1 / 255, 1 / 255, 1 / 255)  # preprocess -> [0, 255], MTCNN's uint8 range

    def __init__(self, detect_size: int = 160, min_face_size: int = 20,
                 thresholds: Sequence[float] = (0.6, 0.7, 0.7)):
        if int(detect_size) < 1 or int(min_face_size) < 12:
            raise ConfigError(f"face_pose: detect_size must be >= 1 and min_face_size >= 12 "
                              f"(got {detect_size}, {min_face_size})")
        if len(thresholds) != 3 or not all(0 <= float(t) <= 1 for t in thresholds):
            raise ConfigError(f"face_pose: thresholds must be three probabilities, got {thresholds!r}")
        try:
            from facenet_pytorch import MTCNN
            self.mtcnn = MTCNN(min_face_size=int(min_face_size), thresholds=[float(t) for t in thresholds],
                               keep_all=True, select_largest=False, device=torch.device("cpu"))
        except (OSError, RuntimeError) as e:
            raise ModelLoadError(f"face_pose: cannot load MTCNN's weights, which ship inside the facenet-pytorch "
                                 f"package ({e}); reinstall it: pip install --force-reinstall facenet-pytorch==2.5.3") from None
        self.detect_size = int(detect_size)

    def to(self, device):
        super().to(device)
        self.mtcnn.device = self.device  # MTCNN moves its inputs to this device
        return self

    def score(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """x: (B, 3, H, W) in [0, 255] -> {name: (B,)}."""
        h, w = x.shape[-2:]
        if min(h, w) < self.detect_size:
            f = self.detect_size / min(h, w)
            x = F.interpolate(x, size=(round(h * f), round(w * f)), mode="bilinear", align_corners=False)
            h, w = x.shape[-2:]
        imgs = x.clamp(0, 255).round().permute(0, 2, 3, 1).contiguous()
        boxes, probs, points = self.mtcnn.detect(imgs, landmarks=True)

        n = len(x)
        out = {k: np.full(n, np.nan) for k in self.attributes}
        out["face_prob"][:] = 0.0
        for i in range(n):
            if boxes[i] is None:
                continue
            p = np.asarray(probs[i], dtype=np.float64)
            j = int(np.argmax(p))
            box = np.asarray(boxes[i][j], dtype=np.float64)
            pts = np.asarray(points[i][j], dtype=np.float64)  # (5, 2) pixels
            out["face_prob"][i] = p[j]
            for k, v in zip(BOX, (box[0] / w, box[1] / h, box[2] / w, box[3] / h)):
                out[k][i] = v
            for li, name in enumerate(LANDMARKS):
                out[f"lm_{name}_x"][i] = pts[li, 0] / w
                out[f"lm_{name}_y"][i] = pts[li, 1] / h
            for k, v in zip(POSE, pose_from_landmarks(pts)):
                out[k][i] = v
        return {k: torch.from_numpy(v).float() for k, v in out.items()}
