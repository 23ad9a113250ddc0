//! Errors of the volume loaders: every one names the file and the reason.

use std::path::{Path, PathBuf};

/// Why a volume could not be read or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VolumeError {
    /// The file system said no (missing file, permissions, ...).
    #[error("{path}: {source}")]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The NIfTI file is malformed or unsupported.
    #[error("{path}: not a usable NIfTI file: {reason}")]
    Nifti {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The DICOM file or series is malformed or unsupported.
    #[error("{path}: not a usable DICOM CT: {reason}")]
    Dicom {
        /// The file or folder.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A folder holds several series and none was chosen.
    #[error("{path}: {} series found, choose one with --series:\n{}", series.len(), series.join("\n"))]
    SeveralSeries {
        /// The folder.
        path: PathBuf,
        /// One line per series: UID, description, slice count.
        series: Vec<String>,
    },
    /// The pieces of a volume do not agree (dimensions, spacing, direction cosines).
    #[error("invalid volume: {0}")]
    Invalid(String),
}

impl VolumeError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        Self::Io {
            path: path.to_owned(),
            source,
        }
    }
    pub(crate) fn nifti(path: &Path, reason: impl std::fmt::Display) -> Self {
        Self::Nifti {
            path: path.to_owned(),
            reason: reason.to_string(),
        }
    }
    pub(crate) fn dicom(path: &Path, reason: impl std::fmt::Display) -> Self {
        Self::Dicom {
            path: path.to_owned(),
            reason: reason.to_string(),
        }
    }
    pub(crate) fn invalid(reason: impl std::fmt::Display) -> Self {
        Self::Invalid(reason.to_string())
    }
}
