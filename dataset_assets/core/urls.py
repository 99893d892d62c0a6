"""IDC's public endpoints and web pages: constants, not settings (``settings`` names the
variables that may override some of them)."""

AWS_ENDPOINT = "https://s3.amazonaws.com"
GCS_ENDPOINT = "https://storage.googleapis.com"
PORTAL_URL = "https://portal.imaging.datacommons.cancer.gov/explore/"
VIEWER_URL = "https://viewer.imaging.datacommons.cancer.gov"
#: Where idc-index fetches the indices idc-index-data describes but does not ship.
INDEX_RELEASES_URL = "https://github.com/ImagingDataCommons/idc-index-data/releases/download"
