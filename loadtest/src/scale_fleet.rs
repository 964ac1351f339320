//! The worker processes of `scale`, seen from the coordinator: each is this binary re-run as
//! `loadtest scale-worker`, fed commands on its stdin, its progress and answers read from its
//! stdout (one JSON object a line).

use std::net::{IpAddr, SocketAddr};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::mpsc;

/// A worker's last progress line.
#[derive(Clone, Copy, Debug, Default)]
pub struct Progress {
    pub open: u64,
    pub failed: u64,
    pub received: u64,
    pub down: u64,
    pub moved: u64,
    pub rss: u64,
}

struct Worker {
    child: Child,
    stdin: ChildStdin,
    progress: Arc<Mutex<Progress>>,
    answers: mpsc::Receiver<Value>,
}

pub struct Fleet {
    workers: Vec<Worker>,
}

impl Fleet {
    /// Starts a worker per source address; worker w binds to `sources[w]`.
    pub async fn start(
        sources: &[IpAddr],
        nodes: &[SocketAddr],
        prefix: &str,
        channels: usize,
    ) -> anyhow::Result<Self> {
        let exe = std::env::current_exe()?;
        let node_list = nodes
            .iter()
            .map(|n| n.to_string())
            .collect::<Vec<_>>()
            .join(",");
        let count = sources.len();
        let mut workers = Vec::with_capacity(count);
        for (w, source) in sources.iter().enumerate() {
            let mut child = Command::new(&exe)
                .arg("scale-worker")
                .args(["--index", &w.to_string(), "--workers", &count.to_string()])
                .args(["--source", &source.to_string(), "--nodes", &node_list])
                .args(["--prefix", prefix, "--channels", &channels.to_string()])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .kill_on_drop(true)
                .spawn()
                .context("starting a worker")?;
            let stdin = child.stdin.take().context("worker stdin")?;
            let stdout = child.stdout.take().context("worker stdout")?;
            let progress = Arc::new(Mutex::new(Progress::default()));
            let (answer, answers) = mpsc::channel(16);
            tokio::spawn(read(stdout, progress.clone(), answer));
            workers.push(Worker {
                child,
                stdin,
                progress,
                answers,
            });
        }
        Ok(Self { workers })
    }

    /// Every worker's last progress, summed.
    pub fn progress(&self) -> Progress {
        let mut sum = Progress::default();
        for worker in &self.workers {
            let p = *worker.progress.lock().expect("not poisoned");
            sum.open += p.open;
            sum.failed += p.failed;
            sum.received += p.received;
            sum.down += p.down;
            sum.moved += p.moved;
            sum.rss += p.rss;
        }
        sum
    }

    async fn send(worker: &mut Worker, command: &Value) -> anyhow::Result<()> {
        let line = format!("{command}\n");
        worker
            .stdin
            .write_all(line.as_bytes())
            .await
            .context("a worker exited")
    }

    /// Has every worker open connections up to its share of `total`, `rate` a second in all.
    pub async fn open(&mut self, total: u64, rate: f64) -> anyhow::Result<()> {
        let count = self.workers.len() as u64;
        for (w, worker) in self.workers.iter_mut().enumerate() {
            let share = total / count + u64::from((w as u64) < total % count);
            let command = json!({"cmd": "open", "target": share, "rate": rate / count as f64});
            Self::send(worker, &command).await?;
        }
        Ok(())
    }

    /// Stops every worker opening more than it has.
    pub async fn hold(&mut self) -> anyhow::Result<()> {
        for worker in &mut self.workers {
            let p = *worker.progress.lock().expect("not poisoned");
            let command = json!({"cmd": "open", "target": p.open + p.failed, "rate": 1});
            Self::send(worker, &command).await?;
        }
        Ok(())
    }

    pub async fn phase(&mut self, t0: u64) -> anyhow::Result<()> {
        for worker in &mut self.workers {
            Self::send(worker, &json!({"cmd": "phase", "t0": t0})).await?;
        }
        Ok(())
    }

    /// Sends `command` to every worker and returns each one's answer.
    pub async fn ask(&mut self, command: Value) -> anyhow::Result<Vec<Value>> {
        for worker in &mut self.workers {
            Self::send(worker, &command).await?;
        }
        let mut answers = Vec::with_capacity(self.workers.len());
        for worker in &mut self.workers {
            let answer = tokio::time::timeout(Duration::from_secs(60), worker.answers.recv())
                .await
                .context("a worker did not answer within 60 s")?
                .context("a worker exited")?;
            answers.push(answer);
        }
        Ok(answers)
    }

    /// Tells every worker to quit and waits for each (the kernel closes their sockets).
    pub async fn quit(mut self) {
        for worker in &mut self.workers {
            let _ = Self::send(worker, &json!({"cmd": "quit"})).await;
        }
        for worker in &mut self.workers {
            if tokio::time::timeout(Duration::from_secs(30), worker.child.wait())
                .await
                .is_err()
            {
                let _ = worker.child.kill().await;
            }
        }
    }
}

async fn read(
    stdout: tokio::process::ChildStdout,
    progress: Arc<Mutex<Progress>>,
    answers: mpsc::Sender<Value>,
) {
    let mut lines = BufReader::new(stdout).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let Ok(value) = serde_json::from_str::<Value>(&line) else {
            continue;
        };
        if value["event"] == "progress" {
            let n = |key: &str| value[key].as_u64().unwrap_or(0);
            *progress.lock().expect("not poisoned") = Progress {
                open: n("open"),
                failed: n("failed"),
                received: n("received"),
                down: n("down"),
                moved: n("moved"),
                rss: n("rss"),
            };
        } else if answers.send(value).await.is_err() {
            return;
        }
    }
}
