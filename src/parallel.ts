/** Bounded parallelism for independent asynchronous work. */

/** Runs `fn` on every item, at most `limit` at a time; resolves when all settled (`fn` handles its own errors). */
export async function inParallel<T>(
  items: readonly T[],
  limit: number,
  fn: (item: T) => Promise<void>,
): Promise<void> {
  let next = 0;
  const worker = async (): Promise<void> => {
    while (next < items.length) await fn(items[next++]!);
  };
  await Promise.all(Array.from({ length: Math.min(limit, items.length) }, worker));
}
