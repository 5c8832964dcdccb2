use std::io::Write;

use proptest::prelude::*;

use super::*;

fn region(base: u64, offset: u64, size: u64, page_size: u64) -> Region {
    Region { base, size, offset, page_size }
}

fn sample() -> Recording {
    Recording {
        identity: FileIdentity { size: 8 << 20, head_crc: 0x1234_5678, tail_crc: 0x9abc_def0 },
        recorded_at_ms: 1_700_000_000_000,
        regions: vec![
            RecordedRegion { offset: 0, size: 4 << 20, page_size: 4096 },
            RecordedRegion { offset: 4 << 20, size: 4 << 20, page_size: 2 << 20 },
        ],
        runs: vec![
            FileRun { offset: 8192, len: 4096 },
            FileRun { offset: 4 << 20, len: 2 << 20 },
            FileRun { offset: 0, len: 16384 },
        ],
    }
}

#[test]
fn a_recording_survives_a_round_trip_through_its_bytes() {
    let r = sample();
    assert_eq!(Recording::decode(&r.encode()).unwrap(), r);
    assert_eq!(r.total_bytes(), 4096 + (2 << 20) + 16384);
    assert_eq!(r.page_runs(), vec![(0, 2, 3), (1, 0, 1), (0, 0, 4)]);
}

#[test]
fn every_truncation_of_a_recording_is_refused() {
    let bytes = sample().encode();
    for len in 0..bytes.len() {
        let err = Recording::decode(&bytes[..len]).unwrap_err();
        assert!(
            matches!(err, FormatError::TooShort(_) | FormatError::Length { .. }),
            "cut at {len}: {err}"
        );
    }
}

#[test]
fn every_flipped_byte_of_a_recording_is_refused() {
    let bytes = sample().encode();
    for i in 0..bytes.len() {
        for bit in [0x01u8, 0x80] {
            let mut b = bytes.clone();
            b[i] ^= bit;
            assert!(Recording::decode(&b).is_err(), "byte {i} bit {bit:#x} went unnoticed");
        }
    }
}

#[test]
fn a_file_with_bytes_appended_is_refused_as_the_wrong_length() {
    let mut b = sample().encode();
    b.extend_from_slice(&[0; 16]);
    assert!(matches!(Recording::decode(&b), Err(FormatError::Length { .. })));
}

#[test]
fn another_magic_or_version_is_named_in_the_refusal() {
    let mut b = sample().encode();
    b[0] = b'X';
    assert_eq!(Recording::decode(&b), Err(FormatError::BadMagic));
    let mut b = sample().encode();
    b[8..12].copy_from_slice(&2u32.to_le_bytes());
    assert_eq!(Recording::decode(&b), Err(FormatError::UnsupportedVersion(2)));
}

/// A recording whose checksum is right but whose content is not: the structural checks catch it.
fn resealed(mut r: Recording, edit: impl FnOnce(&mut Recording)) -> FormatError {
    edit(&mut r);
    Recording::decode(&r.encode()).unwrap_err()
}

#[test]
fn runs_outside_regions_misaligned_or_empty_are_refused_even_with_a_good_checksum() {
    let outside = resealed(sample(), |r| r.runs.push(FileRun { offset: 8 << 20, len: 4096 }));
    assert!(matches!(
        outside,
        FormatError::BadRun { index: 3, why: "it lies in no single region", .. }
    ));
    let across =
        resealed(sample(), |r| r.runs[0] = FileRun { offset: (4 << 20) - 4096, len: 8192 });
    assert!(matches!(across, FormatError::BadRun { index: 0, .. }), "{across}");
    let misaligned = resealed(sample(), |r| r.runs[1] = FileRun { offset: 4 << 20, len: 4096 });
    assert!(matches!(
        misaligned,
        FormatError::BadRun { why: "it is not whole pages of its region", .. }
    ));
    let empty = resealed(sample(), |r| r.runs[0].len = 0);
    assert!(matches!(empty, FormatError::BadRun { why: "it is empty", .. }));
}

#[test]
fn bad_regions_are_refused_even_with_a_good_checksum() {
    let page = resealed(sample(), |r| r.regions[0].page_size = 8192);
    assert!(matches!(page, FormatError::BadRegion { index: 0, .. }), "{page}");
    let past = resealed(sample(), |r| r.identity.size = 6 << 20);
    assert!(matches!(past, FormatError::BadRegion { index: 1, .. }), "{past}");
    let overlap = resealed(sample(), |r| r.regions[1].offset = 2 << 20);
    assert!(matches!(overlap, FormatError::BadRegion { index: 1, .. }), "{overlap}");
}

#[test]
fn a_recording_of_another_memory_file_or_layout_does_not_fit() {
    let r = sample();
    let regions =
        [region(0x1000_0000, 0, 4 << 20, 4096), region(0x4000_0000, 4 << 20, 4 << 20, 2 << 20)];
    assert_eq!(r.fits(&r.identity, &regions), Ok(()));
    let bigger = FileIdentity { size: 16 << 20, ..r.identity };
    let err = r.fits(&bigger, &regions).unwrap_err();
    assert!(err.to_string().contains("8388608 bytes, this one has 16777216"), "{err}");
    let other = FileIdentity { head_crc: 1, ..r.identity };
    let err = r.fits(&other, &regions).unwrap_err();
    assert!(err.to_string().contains("another memory file of the same size"), "{err}");
    let err = r.fits(&r.identity, &regions[..1]).unwrap_err();
    assert!(matches!(err, FitError::Layout { .. }), "{err}");
}

#[test]
fn a_memory_files_identity_hashes_its_first_and_last_mib() {
    let mut f = tempfile::tempfile().unwrap();
    let data: Vec<u8> = (0..3u32 << 20).map(|i| (i % 251) as u8).collect();
    f.write_all(&data).unwrap();
    let id = FileIdentity::of(&f).unwrap();
    assert_eq!(id.size, 3 << 20);
    assert_eq!(id.head_crc, crc32fast::hash(&data[..1 << 20]));
    assert_eq!(id.tail_crc, crc32fast::hash(&data[2 << 20..]));
    // A change in the middle MiB is not part of the identity (see the module's comment).
    f.write_all_at(&[1; 4096], 1 << 20).unwrap();
    assert_eq!(FileIdentity::of(&f).unwrap(), id);
    f.write_all_at(&[1; 4096], 0).unwrap();
    assert_ne!(FileIdentity::of(&f).unwrap(), id);
}

#[test]
fn a_recording_is_written_atomically_with_mode_0600_and_read_back() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ws.bin");
    std::fs::write(&path, b"old").unwrap();
    write_atomically(&path, &sample()).unwrap();
    assert_eq!(read(&path).unwrap(), sample());
    assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    let names: Vec<_> =
        std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names.len(), 1, "no temporary file left: {names:?}");
    std::fs::write(&path, &sample().encode()[..60]).unwrap();
    let err = read(&path).unwrap_err().to_string();
    assert!(err.contains("ws.bin") && err.contains("truncated"), "{err}");
}

#[test]
fn recording_paths_are_checked_like_the_memory_files() {
    let dir = tempfile::tempdir().unwrap();
    let ok = dir.path().join("ws.bin");
    assert!(check_path("record_working_set", ok.to_str().unwrap()).is_ok());
    let err = check_path("record_working_set", "ws.bin").unwrap_err().to_string();
    assert!(err.contains("record_working_set") && err.contains("absolute"), "{err}");
    let dotdot = format!("{}/../ws.bin", dir.path().display());
    assert!(matches!(check_path("f", &dotdot), Err(PathError::DotDot { .. })));
    let missing = dir.path().join("nope/ws.bin");
    assert!(matches!(
        check_path("f", missing.to_str().unwrap()),
        Err(PathError::NoDirectory { .. })
    ));
    assert!(matches!(
        check_path("f", dir.path().to_str().unwrap()),
        Err(PathError::IsDirectory { .. })
    ));
}

#[test]
fn touches_in_order_coalesce_into_one_run() {
    let mut rec = RunRecorder::new(16);
    for p in 0..100 {
        assert!(rec.push(0, p, p + 1));
    }
    rec.push(0, 100, 116); // a read-ahead block continuing it
    rec.push(0, 50, 60); // inside: nothing new
    rec.push(1, 116, 117); // another region: a run of its own
    rec.push(0, 7, 8); // backwards: a run of its own (the order matters)
    let runs: Vec<_> = rec.runs().iter().map(|r| (r.region, r.first, r.end)).collect();
    assert_eq!(runs, vec![(0, 0, 116), (1, 116, 117), (0, 7, 8)]);
}

#[test]
fn the_recorder_stops_at_its_cap_and_counts_what_it_dropped() {
    let mut rec = RunRecorder::new(2);
    assert!(rec.push(0, 10, 11));
    assert!(rec.push(0, 20, 21));
    assert!(rec.full());
    assert!(rec.push(0, 21, 22), "continuing the last run needs no entry");
    assert!(!rec.push(0, 30, 31));
    assert_eq!((rec.runs().len(), rec.dropped()), (2, 1));
    let regions = [region(0x10000, 1 << 20, 1 << 20, 4096)];
    let runs = rec.file_runs(&regions);
    assert_eq!(
        runs,
        vec![
            FileRun { offset: (1 << 20) + 10 * 4096, len: 4096 },
            FileRun { offset: (1 << 20) + 20 * 4096, len: 8192 },
        ]
    );
}

/// Every page in order of first appearance.
fn first_touches(ranges: impl IntoIterator<Item = (usize, u64, u64)>) -> Vec<(usize, u64)> {
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::new();
    for (r, a, b) in ranges {
        for p in a..b {
            if seen.insert((r, p)) {
                out.push((r, p));
            }
        }
    }
    out
}

proptest! {
    #[test]
    fn coalescing_keeps_every_page_and_the_order_of_first_touches(
        touches in proptest::collection::vec((0usize..2, 0u64..64, 1u64..6), 0..200)
    ) {
        let mut rec = RunRecorder::new(usize::MAX);
        let ranges: Vec<_> = touches.iter().map(|&(r, a, n)| (r, a, a + n)).collect();
        for &(r, a, b) in &ranges {
            prop_assert!(rec.push(r, a, b));
        }
        let runs: Vec<_> = rec.runs().iter().map(|r| (r.region, r.first, r.end)).collect();
        prop_assert_eq!(first_touches(runs.clone()), first_touches(ranges.clone()));
        prop_assert!(runs.len() <= ranges.len());
        for w in rec.runs().windows(2) {
            // Nothing left to coalesce: each run starts outside the one before it.
            prop_assert!(w[0].region != w[1].region || !(w[0].first..=w[0].end).contains(&w[1].first));
        }
    }

    #[test]
    fn any_recording_of_valid_runs_round_trips(
        runs in proptest::collection::vec((0u64..1024, 1u64..16), 0..100)
    ) {
        let regions = vec![RecordedRegion { offset: 4096, size: 1040 * 4096, page_size: 4096 }];
        let runs: Vec<_> = runs.iter().map(|&(p, n)| FileRun { offset: 4096 + p * 4096, len: n * 4096 }).collect();
        let r = Recording {
            identity: FileIdentity { size: 1041 * 4096, head_crc: 7, tail_crc: 9 },
            recorded_at_ms: 5,
            regions,
            runs,
        };
        prop_assert_eq!(Recording::decode(&r.encode()).unwrap(), r);
    }
}
