"""The embedded default source: deterministic, chest-radiograph-like DICOM files.

``build(cfg, raw_dir)`` writes ``raw_dir/images/<patient_key>_<k>.dcm`` and returns the manifest, so
the whole pipeline runs anywhere without a download. The data is synthetic and says so: it exercises
the code (DICOM decoding, patient-level splits, training, evaluation), it says nothing clinical.

One module a job: ``anatomy`` (a patient's body), ``render`` (the film, with ``shapes``), ``dicom`` (its
file), ``sites`` (which hospital), ``source`` (plan and build), ``external_site`` (``cxr synthesize-site``).

The image model (``render``) works in "density" units, bright = dense as on a MONOCHROME2 film:
a body silhouette on dark air, two lung fields cut by the diaphragm domes, mediastinum, spine and a
heart to the patient's left (image right), posterior and anterior ribs, clavicles, vessel markings,
and for some patients breast and nipple shadows or a gastric bubble. Pose (shift, rotation, scale),
exposure (gradient, gamma) and noise vary per image; the anatomy is fixed per patient.

Pneumonia = patchy consolidations (smooth blobs of added density with a blotchy texture) whose weight
is exactly zero outside the lung mask. ``difficulty`` (0 obvious .. 1 barely visible) lowers their
contrast, size and count and raises the noise, anatomic variation and the lesion-like "distractor"
blotches every lung has, normal or not.

Everything is deterministic from ``(seed, patient index, image index)``: each patient and each image
has its own ``numpy.random.Generator`` (``SeedSequence([seed, n, k])``), so files can be generated in
any order or in parallel, and the same config writes byte-identical files (UIDs included: they come
from ``generate_uid`` with a deterministic entropy source).

The DICOM encodings are deliberately mixed so every decoding path of ``cxr.imaging.read_image`` is
used: DX / CR, 12-bit data in 16-bit words (some with RescaleSlope/Intercept), some 8-bit files,
WindowCenter/Width on some, MONOCHROME1 on ``monochrome1_fraction`` (stored inverted, so it decodes
to the same picture as its MONOCHROME2 twin) and JPEG 2000 lossless on ``jpeg2000_fraction``. These
fractions are exact per block of 10 images (stratified), so even a tiny build contains every kind.

Sites. ``build`` writes the ``internal`` site, the hospital a model is trained at. ``write_site`` writes
another site's labelled films as an external test set (``cxr synthesize-site``). ``hospital_b`` differs
the way a second hospital does, each difference a reason a model trained on ``internal`` scores lower:
- other patients: ids HSB..., and a seed namespace (a word ahead of every patient index), so no body,
  diagnosis or file is shared with the internal set; older (mean age 63 against 55), more portable AP films
  (45 % against 20 %: magnified heart, higher domes, scapulae over the lungs: rarer in training);
- another case mix: prevalence 0.25 against 0.4 and at most 2 films a patient (AUROC does not depend on
  prevalence, but accuracy, PPV and the validation-chosen threshold do);
- another scanner (``Scanner``, applied to the rendered film before encoding): a tighter field of view
  (x1.1: anatomy and lesions larger than in training), electronic collimation (black borders of
  ~6 % a side, which move the percentile window), detector unsharpness (blur) and more noise, both of which
  eat the faint consolidations' texture, and a gamma of 1.6 (a response curve the per-image percentile
  window cannot undo: lungs darker, low-contrast lesions compressed);
- another resolution (320 px against 256) and more MONOCHROME1 files (70 % against 30 %); these only change
  the decoding path, which should not matter: a check that it does not.
The internal profile changes nothing: its files are byte-identical to those written before sites existed.
"""

from cxr.data.sources.synthetic.anatomy import Anatomy, Severity, sample_anatomy
from cxr.data.sources.synthetic.dicom import Encoding, encode, make_dataset
from cxr.data.sources.synthetic.external_site import SITE_INFO, SITE_MANIFEST, write_site
from cxr.data.sources.synthetic.render import Rendering, render, render_layers
from cxr.data.sources.synthetic.sites import (
    HOSPITAL_B,
    INTERNAL,
    SITES,
    Scanner,
    SiteProfile,
    scan,
    site_config,
    site_profile,
)
from cxr.data.sources.synthetic.source import (
    BLOCK,
    CLASSES,
    RESCALES,
    SOURCE,
    ImagePlan,
    build,
    generate,
    patient_anatomy,
    plan,
)

__all__ = [
    "Anatomy",
    "BLOCK",
    "CLASSES",
    "Encoding",
    "HOSPITAL_B",
    "INTERNAL",
    "ImagePlan",
    "RESCALES",
    "Rendering",
    "SITES",
    "SITE_INFO",
    "SITE_MANIFEST",
    "SOURCE",
    "Scanner",
    "Severity",
    "SiteProfile",
    "build",
    "encode",
    "generate",
    "make_dataset",
    "patient_anatomy",
    "plan",
    "render",
    "render_layers",
    "sample_anatomy",
    "scan",
    "site_config",
    "site_profile",
    "write_site",
]
