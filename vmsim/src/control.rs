//! The simulator's line protocol, so that tests and the demo can drive a VM in a child process:
//! one command per line on stdin, exactly one JSON [`Reply`] per command on stdout.
//!
//! ```text
//! read-random N [SEED]          N pages (or 0.25 / 25% of them), distinct, random order
//! read-seq                      every page once, in order
//! read-range FIRST COUNT        COUNT pages from FIRST on, in order
//! write FIRST COUNT GEN         write generation GEN into COUNT pages from FIRST on
//! balloon REGION OFFSET LEN     MADV_DONTNEED (sizes accept K/M/G)
//! verify                        verify every page
//! reader-start [SEED [FIRST COUNT]]  start the background reader (on pages FIRST.. only);
//!                               answered once it has verified its first page (10 s at most)
//! reader-stop                   stop it; its report
//! smaps                         guest VMAs still uffd-registered (`registered_vmas`; 0 after graduation)
//! standby PATH                  stop the reader (its report: `reader`), write guest memory to the
//!                               new memory file PATH as a Full snapshot, verifying every page
//!                               (`report`); `snapshot`: {path, bytes, regions, ...}
//! exit                          stop the reader, drop the VM (the VMM's EOF)
//! ```
//!
//! A page number is a global page index: pages count region by region, each in its region's
//! page size (a page of a `:2M` region is 2 MiB). After `standby`, the VM is still there: the
//! caller sends `exit`, and restores a new VM from PATH with the `regions` the reply lists.
//!
//! The same commands, comma-separated with `:` between words, form a `--workload` list:
//! `random:0.25,seq,write:0:100:1,verify`.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use uffdpager::firecracker::Region;

use super::guest::Vm;
use super::parse::{parse_number, parse_size, Amount, ParseError};
use super::reader::ReaderHandle;
use super::report::Report;
use super::standby::SnapshotInfo;

/// How long `reader-start` waits for the reader's first verified page before answering anyway.
const READER_START_WAIT: Duration = Duration::from_secs(10);

/// One command of the line protocol (`ReaderStart::pages`: the reader's working set
/// `(first, count)`; `None`: every page).
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    ReadRandom { amount: Amount, seed: Option<u64> },
    ReadSeq,
    ReadRange { first: u64, count: u64 },
    Write { first: u64, count: u64, gen: u32 },
    Balloon { region: usize, offset: u64, len: u64 },
    Verify,
    ReaderStart { seed: Option<u64>, pages: Option<(u64, u64)> },
    ReaderStop,
    Smaps,
    Standby { path: PathBuf },
    Exit,
}

/// Why a command line did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    #[error("empty command")]
    Empty,
    #[error("unknown command {0:?}")]
    Unknown(String),
    #[error("{cmd}: expected {expected}")]
    Arguments { cmd: &'static str, expected: &'static str },
    #[error("{cmd}: {source}")]
    Value { cmd: &'static str, source: ParseError },
}

impl Command {
    /// The command's name, as it appears in replies.
    pub fn name(&self) -> &'static str {
        match self {
            Command::ReadRandom { .. } => "read-random",
            Command::ReadSeq => "read-seq",
            Command::ReadRange { .. } => "read-range",
            Command::Write { .. } => "write",
            Command::Balloon { .. } => "balloon",
            Command::Verify => "verify",
            Command::ReaderStart { .. } => "reader-start",
            Command::ReaderStop => "reader-stop",
            Command::Smaps => "smaps",
            Command::Standby { .. } => "standby",
            Command::Exit => "exit",
        }
    }

    /// Parses a command from its words.
    pub fn from_words(words: &[&str]) -> Result<Command, CommandError> {
        let (&first, args) = words.split_first().ok_or(CommandError::Empty)?;
        let value = |cmd: &'static str| move |source| CommandError::Value { cmd, source };
        let arity = |cmd: &'static str, expected: &'static str, min: usize, max: usize| {
            if (min..=max).contains(&args.len()) {
                Ok(())
            } else {
                Err(CommandError::Arguments { cmd, expected })
            }
        };
        let optional_seed = |cmd: &'static str, i: usize| {
            args.get(i).map(|s| parse_number::<u64>(s)).transpose().map_err(value(cmd))
        };
        Ok(match first {
            "read-random" | "random" => {
                let cmd = "read-random";
                arity(cmd, "N [SEED]", 1, 2)?;
                let amount = args[0].parse::<Amount>().map_err(value(cmd))?;
                Command::ReadRandom { amount, seed: optional_seed(cmd, 1)? }
            }
            "read-seq" | "seq" => {
                arity("read-seq", "no arguments", 0, 0)?;
                Command::ReadSeq
            }
            "read-range" => {
                let cmd = "read-range";
                arity(cmd, "FIRST_PAGE COUNT", 2, 2)?;
                Command::ReadRange {
                    first: parse_number(args[0]).map_err(value(cmd))?,
                    count: parse_number(args[1]).map_err(value(cmd))?,
                }
            }
            "write" => {
                let cmd = "write";
                arity(cmd, "FIRST_PAGE COUNT GEN", 3, 3)?;
                Command::Write {
                    first: parse_number(args[0]).map_err(value(cmd))?,
                    count: parse_number(args[1]).map_err(value(cmd))?,
                    gen: parse_number(args[2]).map_err(value(cmd))?,
                }
            }
            "balloon" => {
                let cmd = "balloon";
                arity(cmd, "REGION_INDEX OFFSET LEN", 3, 3)?;
                Command::Balloon {
                    region: parse_number(args[0]).map_err(value(cmd))?,
                    offset: parse_size(args[1]).map_err(value(cmd))?,
                    len: parse_size(args[2]).map_err(value(cmd))?,
                }
            }
            "verify" => {
                arity("verify", "no arguments", 0, 0)?;
                Command::Verify
            }
            "reader-start" => {
                let cmd = "reader-start";
                let expected = "[SEED [FIRST_PAGE COUNT]]";
                if args.len() == 2 {
                    return Err(CommandError::Arguments { cmd, expected });
                }
                arity(cmd, expected, 0, 3)?;
                let pages = match args.get(1..3) {
                    Some([first, count]) => Some((
                        parse_number(first).map_err(value(cmd))?,
                        parse_number(count).map_err(value(cmd))?,
                    )),
                    _ => None,
                };
                Command::ReaderStart { seed: optional_seed(cmd, 0)?, pages }
            }
            "reader-stop" => {
                arity("reader-stop", "no arguments", 0, 0)?;
                Command::ReaderStop
            }
            "smaps" => {
                arity("smaps", "no arguments", 0, 0)?;
                Command::Smaps
            }
            "standby" => {
                arity("standby", "PATH (a new memory file)", 1, 1)?;
                Command::Standby { path: PathBuf::from(args[0]) }
            }
            "exit" | "quit" => {
                arity("exit", "no arguments", 0, 0)?;
                Command::Exit
            }
            other => return Err(CommandError::Unknown(other.to_owned())),
        })
    }
}

impl FromStr for Command {
    type Err = CommandError;

    /// One protocol line: words separated by whitespace.
    fn from_str(line: &str) -> Result<Self, Self::Err> {
        Command::from_words(&line.split_whitespace().collect::<Vec<_>>())
    }
}

/// Parses a `--workload` list: commands separated by `,`, their words by `:`
/// (`random:0.25,seq,verify`).
pub fn parse_workload_list(list: &str) -> Result<Vec<Command>, CommandError> {
    list.split(',')
        .map(str::trim)
        .filter(|item| !item.is_empty())
        .map(|item| Command::from_words(&item.split(':').map(str::trim).collect::<Vec<_>>()))
        .collect()
}

/// One line of the protocol's output.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Reply {
    pub ok: bool,
    pub cmd: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report: Option<Report>,
    /// `restored`: this process's pid (the VMM pid the pager sees).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// `restored`: the regions as sent in the handshake.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub regions: Option<Vec<Region>>,
    /// `restored`: guest pages (global page indices run from 0 to this).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pages: Option<u64>,
    /// `smaps`: guest memory VMAs still registered with a uffd in MISSING mode (`um` in
    /// `/proc/self/smaps`); 0 once the VM has graduated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registered_vmas: Option<usize>,
    /// `standby`: the memory file written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<SnapshotInfo>,
    /// `standby`: the report of the background reader it stopped, if one ran.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reader: Option<Report>,
}

impl Reply {
    /// A success without a payload.
    pub fn ok(cmd: &str) -> Reply {
        Reply { ok: true, cmd: cmd.to_owned(), ..Reply::default() }
    }

    /// A success carrying a report.
    pub fn report(cmd: &str, report: Report) -> Reply {
        Reply { report: Some(report), ..Reply::ok(cmd) }
    }

    /// A failure.
    pub fn error(cmd: &str, error: impl fmt::Display) -> Reply {
        Reply { ok: false, cmd: cmd.to_owned(), error: Some(error.to_string()), ..Reply::default() }
    }

    /// The reply as one JSON line (without the newline).
    pub fn to_line(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|e| {
            format!(r#"{{"ok":false,"cmd":"{}","error":"serialising the reply: {e}"}}"#, self.cmd)
        })
    }
}

/// Runs protocol commands against one VM and its optional background reader.
#[derive(Debug)]
pub struct CommandRunner {
    vm: Vm,
    reader: Option<ReaderHandle>,
    next_seed: u64,
}

impl CommandRunner {
    /// Drives `vm`.
    pub fn new(vm: Vm) -> CommandRunner {
        CommandRunner { vm, reader: None, next_seed: 1 }
    }

    /// The VM driven.
    pub fn vm(&self) -> &Vm {
        &self.vm
    }

    /// The first line printed: the VM is restored.
    pub fn restored_reply(&self) -> Reply {
        Reply {
            pid: Some(self.vm.pid()),
            regions: Some(self.vm.regions().to_vec()),
            pages: Some(self.vm.pages()),
            ..Reply::ok("restored")
        }
    }

    /// A seed given, or the next of a deterministic sequence.
    fn seed(&mut self, given: Option<u64>) -> u64 {
        given.unwrap_or_else(|| {
            self.next_seed += 1;
            self.next_seed
        })
    }

    /// Executes one command. `Exit` stops the reader; the caller then drops the runner.
    pub fn execute(&mut self, cmd: &Command) -> Reply {
        let name = cmd.name();
        let result = match *cmd {
            Command::ReadRandom { amount, seed } => {
                let seed = self.seed(seed);
                Ok(self.vm.read_random(amount, seed))
            }
            Command::ReadSeq => Ok(self.vm.read_sequential()),
            Command::ReadRange { first, count } => self.vm.read_range(first, count),
            Command::Verify => Ok(self.vm.verify_all()),
            Command::Write { first, count, gen } => self.vm.write_range(first, count, gen),
            Command::Balloon { region, offset, len } => self.vm.balloon(region, offset, len),
            Command::ReaderStart { seed, pages } => {
                if self.reader.is_some() {
                    return Reply::error(name, "a reader is already running");
                }
                let seed = self.seed(seed);
                let (first, count) = pages.unwrap_or((0, self.vm.pages()));
                return match self.vm.spawn_reader_in(seed, first, count) {
                    Ok(handle) => {
                        // Answer once it reads: a caller that starts work "while a reader
                        // runs" next must find it running, however busy the machine is.
                        handle.wait_for_pages(1, READER_START_WAIT);
                        self.reader = Some(handle);
                        Reply::ok(name)
                    }
                    Err(e) => Reply::error(name, e),
                };
            }
            Command::ReaderStop => match self.reader.take() {
                Some(handle) => handle.stop(),
                None => return Reply::error(name, "no reader is running"),
            },
            Command::Smaps => {
                return match self.vm.uffd_registered_vmas() {
                    Ok(n) => Reply { registered_vmas: Some(n), ..Reply::ok(name) },
                    Err(e) => Reply::error(name, e),
                };
            }
            Command::Standby { ref path } => return self.standby(path),
            Command::Exit => {
                let reply = match self.reader.take().map(ReaderHandle::stop) {
                    Some(Ok(report)) => Reply::report(name, report),
                    Some(Err(e)) => Reply::error(name, e),
                    None => Reply::ok(name),
                };
                return reply;
            }
        };
        match result {
            Ok(report) => Reply::report(name, report),
            Err(e) => Reply::error(name, e),
        }
    }

    /// `standby PATH`: pauses the workload (stops the background reader), then writes the
    /// snapshot. The reader's report travels in `reader`, so its mismatches are not lost.
    fn standby(&mut self, path: &std::path::Path) -> Reply {
        let name = "standby";
        let reader = match self.reader.take().map(ReaderHandle::stop).transpose() {
            Ok(report) => report,
            Err(e) => return Reply::error(name, e),
        };
        match self.vm.standby(path) {
            Ok((report, info)) => {
                Reply { snapshot: Some(info), reader, ..Reply::report(name, report) }
            }
            Err(e) => Reply { reader, ..Reply::error(name, e) },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_parse_from_protocol_lines() {
        assert_eq!(
            "read-random 200".parse(),
            Ok(Command::ReadRandom { amount: Amount::Pages(200), seed: None })
        );
        assert_eq!(
            "read-random 25% 9".parse(),
            Ok(Command::ReadRandom { amount: Amount::Fraction(0.25), seed: Some(9) })
        );
        assert_eq!("  read-seq ".parse(), Ok(Command::ReadSeq));
        assert_eq!("write 10 5 3".parse(), Ok(Command::Write { first: 10, count: 5, gen: 3 }));
        assert_eq!(
            "balloon 1 64K 2M".parse(),
            Ok(Command::Balloon { region: 1, offset: 64 << 10, len: 2 << 20 })
        );
        assert_eq!("verify".parse(), Ok(Command::Verify));
        assert_eq!(
            "reader-start 4".parse(),
            Ok(Command::ReaderStart { seed: Some(4), pages: None })
        );
        assert_eq!("reader-start".parse(), Ok(Command::ReaderStart { seed: None, pages: None }));
        assert_eq!(
            "reader-start 4 100 50".parse(),
            Ok(Command::ReaderStart { seed: Some(4), pages: Some((100, 50)) })
        );
        assert_eq!("read-range 7 9".parse(), Ok(Command::ReadRange { first: 7, count: 9 }));
        assert_eq!(
            "standby /tmp/s1.mem".parse(),
            Ok(Command::Standby { path: PathBuf::from("/tmp/s1.mem") })
        );
        assert_eq!("reader-stop".parse(), Ok(Command::ReaderStop));
        assert_eq!("smaps".parse(), Ok(Command::Smaps));
        assert_eq!("exit".parse(), Ok(Command::Exit));
    }

    #[test]
    fn bad_command_lines_are_errors_not_panics() {
        assert_eq!("".parse::<Command>(), Err(CommandError::Empty));
        assert_eq!("fly".parse::<Command>(), Err(CommandError::Unknown("fly".into())));
        assert!(matches!(
            "write 1 2".parse::<Command>(),
            Err(CommandError::Arguments { cmd: "write", .. })
        ));
        assert!(matches!(
            "write 1 2 x".parse::<Command>(),
            Err(CommandError::Value { cmd: "write", .. })
        ));
        assert!(matches!(
            "write 1 2 99999999999".parse::<Command>(),
            Err(CommandError::Value { .. })
        ));
        assert!(matches!("verify now".parse::<Command>(), Err(CommandError::Arguments { .. })));
        assert!(matches!("read-random".parse::<Command>(), Err(CommandError::Arguments { .. })));
        assert!(matches!("balloon 0 1Q 4K".parse::<Command>(), Err(CommandError::Value { .. })));
        assert!(matches!(
            "reader-start 4 100".parse::<Command>(),
            Err(CommandError::Arguments { cmd: "reader-start", .. })
        ));
        assert!(matches!("standby".parse::<Command>(), Err(CommandError::Arguments { .. })));
        assert!(matches!("standby a b".parse::<Command>(), Err(CommandError::Arguments { .. })));
        assert!(matches!("read-range 1".parse::<Command>(), Err(CommandError::Arguments { .. })));
    }

    #[test]
    fn workload_lists_use_commas_and_colons() {
        assert_eq!(
            parse_workload_list("random:0.25,seq, write:0:100:2 ,verify").unwrap(),
            vec![
                Command::ReadRandom { amount: Amount::Fraction(0.25), seed: None },
                Command::ReadSeq,
                Command::Write { first: 0, count: 100, gen: 2 },
                Command::Verify,
            ]
        );
        assert!(parse_workload_list("random:0.25,jump").is_err());
    }

    #[test]
    fn replies_are_one_json_line_in_the_documented_shape() {
        let line = Reply::error("write", "page 9 does not exist").to_line();
        assert_eq!(line, r#"{"ok":false,"cmd":"write","error":"page 9 does not exist"}"#);
        let line = Reply::report("verify", Report::default()).to_line();
        assert!(line.starts_with(r#"{"ok":true,"cmd":"verify","report":{"workload":"""#), "{line}");
        let back: Reply = serde_json::from_str(&line).unwrap();
        assert_eq!(back.report, Some(Report::default()));
        assert!(!line.contains('\n'));
    }
}
