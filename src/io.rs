//! Small file helpers shared by every writer: atomic replacement, and guards around
//! third-party decoders.

use std::path::{Path, PathBuf};

/// Writes a file atomically: `write` fills a temporary file in the same folder (its name ends
/// with the final file name, so extension-sniffing writers such as NIfTI's `.nii.gz` behave),
/// which is then flushed and renamed over `path`. A crash leaves either the old file or the new
/// one, never a half-written one.
pub fn atomic_write_with<F>(path: &Path, write: F) -> std::io::Result<()>
where
    F: FnOnce(&Path) -> std::io::Result<()>,
{
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| std::io::Error::other(format!("{} has no file name", path.display())))?;
    let tmp = tempfile::Builder::new()
        .prefix(".fluoropose-tmp-")
        .suffix(&format!("-{}", name.to_string_lossy()))
        .tempfile_in(&dir)?;
    let tmp_path = tmp.path().to_path_buf();
    // Keep the file handle alive so the name stays reserved; the writer reopens it by path.
    let result = write(&tmp_path).and_then(|()| {
        std::fs::File::open(&tmp_path)?.sync_all()?;
        Ok(())
    });
    // Temporary files are created private (0600); give the result the permissions the file it
    // replaces had, or the usual 0644 for a new one.
    let result = result.and_then(|()| {
        let perms = match std::fs::metadata(path) {
            Ok(m) => Some(m.permissions()),
            Err(_) => default_permissions(),
        };
        perms.map_or(Ok(()), |p| std::fs::set_permissions(&tmp_path, p))
    });
    match result {
        Ok(()) => tmp.persist(path).map(|_| ()).map_err(|e| e.error),
        Err(e) => Err(e), // `tmp` is deleted on drop
    }
}

#[cfg(unix)]
fn default_permissions() -> Option<std::fs::Permissions> {
    use std::os::unix::fs::PermissionsExt;
    Some(std::fs::Permissions::from_mode(0o644))
}

#[cfg(not(unix))]
fn default_permissions() -> Option<std::fs::Permissions> {
    None
}

/// Writes bytes atomically (see [`atomic_write_with`]).
pub fn atomic_write(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    atomic_write_with(path, |tmp| std::fs::write(tmp, bytes))
}

/// Runs a third-party decoder, turning a panic inside it into an error message. Our own code
/// does not panic on user data; this guards the crates we call against inputs they mishandle.
pub fn catch_panic<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|p| {
        p.downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| p.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".into())
    })
}

/// Refuses a DICOM file one of whose data elements claims more bytes than the file holds.
/// dicom-rs allocates and zeroes a value's whole claimed length before it reads the value, so
/// a few hundred hostile or corrupt bytes claiming 4 GiB cost 4 GiB of memory and seconds
/// (measured: 4.2 GB resident for a 274-byte file). The lazy reader used here sees each
/// element's header and skips its value, allocating nothing. Files it cannot follow (no
/// group length, an unknown or deflated transfer syntax, a parse error) are left to the real
/// parser, which reports them. With `headers_only`, the scan stops at the pixel data, as a
/// header read (`read_until(PIXEL_DATA)`) does: a file cut short inside its pixels still has
/// readable headers, and the decoder then names it.
pub fn check_dicom_lengths(path: &Path, headers_only: bool) -> Result<(), String> {
    use dicom::dictionary_std::tags;
    use dicom::parser::dataset::lazy_read::LazyDataSetReader;
    use dicom::parser::dataset::{DataToken, LazyDataToken};
    use dicom::parser::stateful::decode::StatefulDecode;
    use dicom::transfer_syntax::{TransferSyntaxIndex, TransferSyntaxRegistry, entries};
    use std::io::{Read, Seek, SeekFrom};

    let file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let size = file.metadata().map_err(|e| e.to_string())?.len();
    let mut f = std::io::BufReader::new(file);
    let too_long = |len: u64, at: u64| {
        format!(
            "a data element claims {len} bytes at byte {at}, but the file holds {size}: \
             the file is corrupt or truncated"
        )
    };
    // Checks every value length of the data set from `start` to the end, in `ts`.
    let scan = |f: &mut std::io::BufReader<std::fs::File>,
                start: u64,
                ts: &dicom::encoding::TransferSyntax|
     -> Result<(), String> {
        if f.seek(SeekFrom::Start(start)).is_err() {
            return Ok(());
        }
        let Ok(mut reader) = LazyDataSetReader::new_with_ts(f, ts) else {
            return Ok(());
        };
        while let Some(Ok(token)) = reader.advance() {
            let pixel_data = matches!(&token, LazyDataToken::PixelSequenceStart)
                || matches!(&token, LazyDataToken::ElementHeader(h) if h.tag == tags::PIXEL_DATA);
            if headers_only && pixel_data {
                return Ok(());
            }
            // (value length, where the value starts) of the values a parser would allocate.
            let claim = match &token {
                LazyDataToken::LazyValue { header, decoder } if header.len.is_defined() => {
                    Some((header.len.0, decoder.position()))
                }
                LazyDataToken::LazyItemValue { len, decoder } => Some((*len, decoder.position())),
                // Sequences and items are parsed element by element, not allocated whole.
                _ => None,
            };
            if let Some((len, at)) = claim
                && at + u64::from(len) > size
            {
                return Err(too_long(len.into(), at));
            }
            if token.skip().is_err() {
                return Ok(());
            }
        }
        Ok(())
    };
    let mut head = [0u8; 132];
    let got = f.read(&mut head).map_err(|e| e.to_string())?;
    let meta_start = if got == 132 && &head[128..132] == b"DICM" {
        Some(132)
    } else if got >= 4 && &head[..4] == b"DICM" {
        Some(4)
    } else {
        None
    };
    let Some(meta_start) = meta_start else {
        // No meta group: an ACR-NEMA style data set, read as implicit VR little endian.
        return scan(&mut f, 0, &entries::IMPLICIT_VR_LITTLE_ENDIAN.erased());
    };
    // The meta group (explicit VR little endian): its length, then the transfer syntax.
    if f.seek(SeekFrom::Start(meta_start)).is_err() {
        return Ok(());
    }
    let explicit = entries::EXPLICIT_VR_LITTLE_ENDIAN.erased();
    let (mut meta_end, mut uid) = (None::<u64>, None::<String>);
    {
        let Ok(mut reader) = LazyDataSetReader::new_with_ts(&mut f, &explicit) else {
            return Ok(());
        };
        while let Some(Ok(token)) = reader.advance() {
            // A header comes first, then its value with the decoder's position.
            if let LazyDataToken::ElementHeader(_) = token {
                continue;
            }
            let LazyDataToken::LazyValue { header, decoder } = &token else {
                break;
            };
            let (tag, len, at) = (header.tag, header.len, decoder.position());
            if !len.is_defined() {
                break;
            }
            if at + u64::from(len.0) > size {
                return Err(too_long(len.0.into(), at));
            }
            let end = at + u64::from(len.0);
            if tag == tags::FILE_META_INFORMATION_GROUP_LENGTH || tag == tags::TRANSFER_SYNTAX_UID {
                let Ok(DataToken::PrimitiveValue(v)) = token.into_owned() else {
                    break;
                };
                if tag == tags::TRANSFER_SYNTAX_UID {
                    uid = Some(v.to_str().trim_end_matches(['\0', ' ']).to_string());
                } else {
                    meta_end = v.to_int::<u32>().ok().map(|l| end + u64::from(l));
                }
            } else if token.skip().is_err() {
                break;
            }
            if meta_end.is_none_or(|m| end >= m) {
                // Without a group length the meta group's end is unknown: stop here.
                break;
            }
        }
    }
    let (Some(start), Some(uid)) = (meta_end, uid) else {
        return Ok(());
    };
    match TransferSyntaxRegistry.get(&uid) {
        // A data set codec (deflate) means the lengths count inflated bytes: not checked.
        Some(ts)
            if !matches!(
                ts.codec(),
                dicom::encoding::transfer_syntax::Codec::Dataset(_)
            ) =>
        {
            scan(&mut f, start, ts)
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A data set with no preamble or meta group (ACR-NEMA style, implicit VR little endian):
    /// accepted as written; refused once an element claims more bytes than the file holds,
    /// before any parser allocates them; and cut short, refused too.
    #[test]
    fn dicom_lengths_beyond_the_file_are_refused() {
        use dicom::core::{DataElement, PrimitiveValue, VR};
        use dicom::dictionary_std::tags;
        use dicom::object::InMemDicomObject;
        let obj = InMemDicomObject::from_element_iter([
            DataElement::new(tags::PATIENT_NAME, VR::PN, PrimitiveValue::from("Doe^J")),
            DataElement::new(tags::ROWS, VR::US, PrimitiveValue::from(4u16)),
            DataElement::new(
                tags::PIXEL_DATA,
                VR::OB,
                PrimitiveValue::from(vec![7u8; 16]),
            ),
        ]);
        let mut bytes = Vec::new();
        let ts = dicom::transfer_syntax::entries::IMPLICIT_VR_LITTLE_ENDIAN.erased();
        obj.write_dataset_with_ts(&mut bytes, &ts).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("acr.dcm");
        std::fs::write(&p, &bytes).unwrap();
        assert_eq!(check_dicom_lengths(&p, false), Ok(()));
        // The pixel data's length (implicit VR: tag, then 4 length bytes).
        let at = bytes
            .windows(4)
            .position(|w| w == [0xe0, 0x7f, 0x10, 0x00])
            .unwrap();
        let mut hostile = bytes.clone();
        hostile[at + 4..at + 8].copy_from_slice(&0xffff_fff0u32.to_le_bytes());
        std::fs::write(&p, &hostile).unwrap();
        let e = check_dicom_lengths(&p, false).unwrap_err();
        assert!(e.contains("claims 4294967280 bytes"), "{e}");
        // The headers before the pixel data are sound.
        assert_eq!(check_dicom_lengths(&p, true), Ok(()));
        std::fs::write(&p, &bytes[..bytes.len() - 4]).unwrap();
        assert!(
            check_dicom_lengths(&p, false)
                .unwrap_err()
                .contains("claims 16 bytes")
        );
        // Not a file at all.
        assert!(check_dicom_lengths(&dir.path().join("nope.dcm"), false).is_err());
    }

    #[test]
    fn atomic_write_replaces_and_leaves_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.json");
        atomic_write(&p, b"one").unwrap();
        atomic_write(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(
                std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
                0o644
            );
        }
    }

    #[test]
    fn failed_write_keeps_the_old_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.json");
        atomic_write(&p, b"precious").unwrap();
        let r = atomic_write_with(&p, |tmp| {
            std::fs::write(tmp, b"half")?;
            Err(std::io::Error::other("crash"))
        });
        assert!(r.is_err());
        assert_eq!(std::fs::read(&p).unwrap(), b"precious");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
