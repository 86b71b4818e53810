"""``python -m cbam_hrnet_d2.data``: generate the shapes set, or ``--check`` registered datasets."""

from cbam_hrnet_d2.data.datasets import main

raise SystemExit(main())
