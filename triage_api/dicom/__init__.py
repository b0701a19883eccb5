"""DICOM networking: the C-STORE door, DICOMweb, and AI results back to the PACS as SR."""
