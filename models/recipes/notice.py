"""Copyright notice of the MNI ICBM152 2009 template, kept with everything derived from it."""

from __future__ import annotations

MNI_COPYRIGHT = """\
Copyright (C) 1993-2009 Louis Collins, McConnell Brain Imaging Centre, Montreal Neurological
Institute, McGill University. Permission to use, copy, modify, and distribute this software and
its documentation for any purpose and without fee is hereby granted, provided that the above
copyright notice appear in all copies. The authors and McGill University make no
representations about the suitability of this software for any purpose. It is provided "as is"
without express or implied warranty. The authors are not responsible for any data loss,
equipment damage, property loss, or injury to subjects or patients resulting from the use or
misuse of this software package."""

TEMPLATE_SOURCE = (
    "MNI ICBM152 2009a non-linear template as shipped in the nilearn wheel\n"
    "(mni_icbm152_{t1,gm,wm}_tal_nlin_sym_09a_converted.nii.gz: the T1-weighted image and\n"
    "the grey/white matter probability maps, 1 mm, 197 x 233 x 189)."
)

SIMULATED_T2 = (
    "The T2-weighted images are SIMULATED: computed from the template's tissue probability\n"
    "maps with the spin-echo signal equation and BrainWeb-style literature tissue parameters.\n"
    "They are not acquired MR images."
)

REFERENCES = """\
- Fonov V. S. et al., Unbiased average age-appropriate atlases for pediatric studies,
  NeuroImage 54(1):313-327 (2011).
- Fonov V. S. et al., Unbiased nonlinear average age-appropriate brain templates from birth
  to adulthood, NeuroImage 47 Suppl 1:S102 (2009).
- Collins D. L. et al., ANIMAL+INSECT: improved cortical structure segmentation,
  IPMI 1999, LNCS 1613:210-223.
- Kwan R. K.-S., Evans A. C., Pike G. B., MRI simulation-based evaluation of image-processing
  and classification methods, IEEE TMI 18(11):1085-1097 (1999) (BrainWeb).
- Collins D. L. et al., Design and construction of a realistic digital brain phantom,
  IEEE TMI 17(3):463-468 (1998) (BrainWeb)."""
